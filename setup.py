"""Build ldeq_fast and its native extension ``ldeq_fast._C``.

The C++ (CPU) sources under csrc/ are always compiled; CUDA sources under csrc/cuda/ are added only
when torch is a CUDA build *and* a CUDA toolkit (nvcc) is found.  Set ``LDEQ_FAST_NO_EXT=1`` to skip
the native build entirely (the package then runs on its Triton / PyTorch backends), or
``LDEQ_FAST_NO_CUDA=1`` to build the CPU part only.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("LDEQ_FAST_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and not _flag("LDEQ_FAST_NO_CUDA"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "ldeq_fast._C", sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("LDEQ_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "ldeq_fast._C", sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "ldeq_fast", "ldeq_fast.ops", "ldeq_fast.solvers", "ldeq_fast.model", "ldeq_fast.video",
        "ldeq_fast.data", "ldeq_fast.data.synthetic", "ldeq_fast.compat", "ldeq_fast.kernels",
    ],
    package_dir={"ldeq_fast.kernels": "kernels"},
    package_data={"ldeq_fast": ["assets/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
