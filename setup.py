"""Builds paradec._C from csrc/ when sources are there; a pure-Python install otherwise.

The CPU kernels are always built; CUDA kernels when CUDA is available or PARADEC_FORCE_CUDA=1.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are read by torch's cpp_extension itself. Install with
`pip install --no-build-isolation` so the extension builds against the torch already installed.
"""

import glob
import os

from setuptools import setup


def extension_modules():
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not cpp_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    with_cuda = bool(cuda_sources) and (
        torch.cuda.is_available() or os.environ.get("PARADEC_FORCE_CUDA") == "1"
    )
    # -fopenmp: at::parallel_for spreads rows over threads only when OpenMP is compiled in.
    extra = {"cxx": ["-O3", "-std=c++17", "-fopenmp"] + _simd_flags()}
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
        ext = CUDAExtension("paradec._C", cpp_sources + cuda_sources, extra_compile_args=extra,
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("paradec._C", cpp_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


def _simd_flags() -> list[str]:
    """AVX2/FMA when the building machine has them (the extension is built where it runs)."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if "avx2" in flags and "fma" in flags else []


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
