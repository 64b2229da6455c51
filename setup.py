"""Build fastdw._C: C++ CPU kernels always, CUDA kernels when asked for or when a GPU can use them.

The CPU kernels are compiled once per instruction set (csrc/cpu/isa/<isa>.cpp, each with its own
-m flags) and chosen at run time, so one wheel runs on any x86-64 CPU and uses AVX-512 where present.

CUDA (csrc/cuda/*.cu) is built when FASTDW_CUDA=1, or, with FASTDW_CUDA unset, when a CUDA toolkit
is found and torch sees a GPU; FASTDW_CUDA=0 never builds it. So a plain build on a machine without
a GPU does not spend minutes in nvcc (`make build-cuda-check` compiles the CUDA kernels there).
The toolkit is CUDA_HOME / CUDA_PATH if set, else the one behind `nvcc` on PATH (following a
wrapper script's `exec` line), else the newest /usr/local/cuda-*. TORCH_CUDA_ARCH_LIST is
respected; unset and with no GPU visible it defaults to "8.0;9.0" (A100, H100).
See DEVELOPERS.md.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil


def _toolkit_of(nvcc: str) -> str | None:
    """The toolkit root of an nvcc binary, or of the binary a wrapper script execs."""
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"#!"):  # a wrapper script: find the nvcc it runs
        m = re.search(rb"""exec\s+["']?([^\s"']*/nvcc)\b""", head)
        return _toolkit_of(m.group(1).decode()) if m else None
    root = os.path.dirname(os.path.dirname(nvcc))
    return root if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) else None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    root = _toolkit_of(nvcc) if nvcc else None
    if root:
        return root

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(v) for v in re.findall(r"\d+", os.path.basename(path)))

    for cand in sorted(glob.glob("/usr/local/cuda-*"), key=version, reverse=True) + ["/usr/local/cuda"]:
        root = _toolkit_of(os.path.join(cand, "bin", "nvcc"))
        if root:
            return root
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first, to the real toolkit.
_CUDA_HOME = _find_cuda_home()
if _CUDA_HOME:
    os.environ["CUDA_HOME"] = _CUDA_HOME

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))

# Per-ISA translation units and their flags. The DEFAULT build uses no -m flags beyond the baseline.
ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "avx512": [
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi2",
    ],
}
if platform.machine().lower() not in ("x86_64", "amd64"):
    ISA_FLAGS = {"default": ISA_FLAGS["default"]}
# FASTDW_CPU_ISAS=avx512 (a comma list; "default" is always built): fewer ISA objects, for a quicker
# build while iterating on a kernel. Tests that switch instruction sets skip the ones not built.
if os.environ.get("FASTDW_CPU_ISAS"):
    _wanted = {"default"} | {v.strip() for v in os.environ["FASTDW_CPU_ISAS"].split(",") if v.strip()}
    ISA_FLAGS = {k: v for k, v in ISA_FLAGS.items() if k in _wanted}


def _want_cuda() -> bool:
    flag = os.environ.get("FASTDW_CUDA")
    if flag is not None:
        return flag == "1"
    has_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return _CUDA_HOME is not None and has_sources and torch.cuda.is_available()


def _cuda_flags() -> tuple[list[str], list[str]]:
    """(cxx, nvcc) flags of the CUDA build; sets the default architectures."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # The pip wheels (nvidia-*-cu13) ship headers that torch's CUDA headers include but a bare
    # toolkit may lack (cusparse.h, cublas_v2.h, ...). -isystem: searched after the toolkit's own
    # include dir, so only headers missing there come from the wheel.
    extra = []
    major = (torch.version.cuda or "").split(".")[0]
    try:
        import nvidia

        for base in nvidia.__path__:
            inc = os.path.join(base, f"cu{major}", "include")
            if major and os.path.isdir(inc):
                extra += ["-isystem", inc]
    except ImportError:
        pass
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + extra
    return ["-DFASTDW_WITH_CUDA"] + extra, nvcc


class BuildExt(BuildExtension):
    """BuildExtension that first compiles the per-ISA kernel objects, each with its own flags.

    The ISA objects are compiled concurrently (up to MAX_JOBS at once, default: the CPU count),
    each in its own folder (torch's ninja wrapper writes one build.ninja per output folder). Each
    one compiles every kernel (~3-4 min on a 2-core machine); one after the other they left the
    second core idle for two thirds of a from-scratch build."""

    def build_extension(self, ext):
        from concurrent.futures import ThreadPoolExecutor

        args = ext.extra_compile_args
        cxx = args["cxx"] if isinstance(args, dict) else args
        depends = glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)

        def compile_isa(isa: str) -> list[str]:
            return self.compiler.compile(
                [os.path.join("csrc", "cpu", "isa", f"{isa}.cpp")],
                output_dir=os.path.join(self.build_temp, "isa", isa),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": list(cxx) + ISA_FLAGS[isa], "nvcc": []},
                depends=depends,
            )

        jobs = max(1, min(len(ISA_FLAGS), int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)))
        with ThreadPoolExecutor(jobs) as pool:
            objects = [obj for objs in pool.map(compile_isa, ISA_FLAGS) for obj in objs]
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DFASTDW_ISAS=" + ",".join(ISA_FLAGS)]
    cxx += ["-DFASTDW_HAVE_" + isa.upper() for isa in ISA_FLAGS]
    kwargs = dict(
        name="fastdw._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda():
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        cxx_extra, nvcc = _cuda_flags()
        kwargs["extra_compile_args"]["cxx"] += cxx_extra
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        return [CUDAExtension(**kwargs)]
    return [CppExtension(**kwargs)]


setup(
    name="fastdw",
    version="0.1.0",
    packages=find_packages(include=["fastdw", "fastdw.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    zip_safe=False,
)
