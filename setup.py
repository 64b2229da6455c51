"""Build fastdw._C: C++ CPU kernels always, CUDA kernels when a toolkit is found or FASTDW_CUDA=1.

The CPU kernels are compiled once per instruction set (csrc/cpu/isa/<isa>.cpp, each with its own
-m flags) and chosen at run time, so one wheel runs on any x86-64 CPU and uses AVX-512 where present.
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

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


def _want_cuda() -> bool:
    flag = os.environ.get("FASTDW_CUDA")
    if flag is not None:
        return flag == "1"
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


class BuildExt(BuildExtension):
    """BuildExtension that first compiles the per-ISA kernel objects, each with its own flags."""

    def build_extension(self, ext):
        args = ext.extra_compile_args
        cxx = args["cxx"] if isinstance(args, dict) else args
        objects = []
        for isa, flags in ISA_FLAGS.items():
            src = os.path.join("csrc", "cpu", "isa", f"{isa}.cpp")
            objects += self.compiler.compile(
                [src],
                output_dir=os.path.join(self.build_temp, "isa"),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": list(cxx) + flags, "nvcc": []},
                depends=glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True),
            )
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
        kwargs["extra_compile_args"]["cxx"].append("-DFASTDW_WITH_CUDA")
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
