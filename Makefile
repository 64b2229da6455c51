# Everything a person does twice. `make test` and `make bench` set everything up themselves:
# .venv with pinned dependencies, then the fastdw extension built in place (ninja, incremental).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
DEPS    := $(VENV)/.deps-stamp
BUILD   := .stamp-build
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py Makefile

.PHONY: all venv build build-cuda-check test test-fast bench bench-quick bench-shuffle lint format selftest clean distclean

all: build

$(DEPS): requirements.txt requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(DEPS)

$(BUILD): $(DEPS) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py -q build_ext --inplace
	# Put the checkout on the venv's path (an editable install without a second build).
	echo "$(CURDIR)" > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fastdw-checkout.pth"
	touch $@

build: $(BUILD)

test: $(BUILD)
	$(VPY) -m pytest tests -q -ra

# Compile the CUDA kernels (no GPU needed) for sm_80 and sm_90 into build/cuda-check*, leaving the
# CPU build in fastdw/ alone, and check that the CUDA-built .so imports here with every op's CUDA
# kernel registered. Fails if nvcc fails. FASTDW_CUDA_ARCHS overrides the architectures.
FASTDW_CUDA_ARCHS ?= 8.0;9.0
build-cuda-check: $(DEPS)
	FASTDW_CUDA=1 TORCH_CUDA_ARCH_LIST="$(FASTDW_CUDA_ARCHS)" MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py -q \
	  build_ext --build-temp build/cuda-check --build-lib build/cuda-check-lib
	FASTDW_CUDA_CHECK_LIB=build/cuda-check-lib $(VPY) -m pytest tests/test_cuda_build.py -q -ra

bench: $(BUILD)
	$(VPY) -m fastdw.bench

selftest: $(BUILD)
	$(VPY) -m fastdw.selftest

bench-shuffle: $(BUILD)
	$(VPY) -m bench.shuffle

lint: $(DEPS)
	$(VPY) -m ruff check fastdw tests bench setup.py

format: $(DEPS)
	$(VPY) -m ruff format fastdw tests bench setup.py

clean:
	rm -rf build $(BUILD) fastdw/*.so

distclean: clean
	rm -rf $(VENV)
