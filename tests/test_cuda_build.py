"""The CUDA-built extension (``make build-cuda-check``) loads on a machine without a GPU.

``make build-cuda-check`` compiles fastdw._C with the CUDA kernels (FASTDW_CUDA=1, sm_80 and sm_90)
into build/cuda-check-lib, away from the CPU build in fastdw/, then runs this test. It imports that
.so in a fresh interpreter together with this checkout's Python package and checks that the CPU
ops still work and that every op has a CUDA kernel registered. Skipped when that build is absent
(a plain ``make test``). The CUDA kernels themselves cannot run without a GPU.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.abspath(os.environ.get("FASTDW_CUDA_CHECK_LIB", os.path.join(ROOT, "build", "cuda-check-lib")))
SO = sorted(glob.glob(os.path.join(LIB, "fastdw", "_C*.so")))

OPS = ("dwconv_bn_act", "dwconv_bn_act_backward", "se_scale", "se_scale_backward", "channel_shuffle",
       "concat_shuffle", "concat_shuffle_backward")

# Run in a subprocess: loads the CUDA-built .so as fastdw._C before fastdw itself is imported.
CHECK = r"""
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("fastdw._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["fastdw._C"] = mod
spec.loader.exec_module(mod)
import fastdw
assert fastdw._backend.extension_loaded(), fastdw._backend.extension_error()
import os.path
assert os.path.samefile(sys.modules["fastdw._C"].__file__, sys.argv[1]), sys.modules["fastdw._C"].__file__
for op in sys.argv[2].split(","):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fastdw::" + op, key), (op, key)
x = torch.randn(2, 6, 5, 5)
assert torch.equal(torch.ops.fastdw.channel_shuffle(x, 3), torch.nn.functional.channel_shuffle(x, 3))
w = torch.randn(6, 1, 3, 3)
with fastdw.use_backend("cpu"):
    y = fastdw.ops.dwconv_bn_act(x, w, padding=1, activation="relu")
ref = torch.relu(torch.nn.functional.conv2d(x, w, padding=1, groups=6))
torch.testing.assert_close(y, ref)
print("ok", mod.cpu_capability(), fastdw.backends())
"""


# Set by `make build-cuda-check`: there a missing .so is a failure, not a skip.
REQUIRED = "FASTDW_CUDA_CHECK_LIB" in os.environ


@pytest.mark.skipif(not SO and not REQUIRED, reason="no CUDA-built extension (make build-cuda-check)")
def test_cuda_build_imports_and_registers_cuda_kernels():
    assert SO, f"no fastdw/_C*.so under {LIB}"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHECK, SO[0], ",".join(OPS)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
