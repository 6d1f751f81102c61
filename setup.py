"""Build ldeq_fast and its native extension ``ldeq_fast._C`` (the CPU kernels of the fused ops, csrc/).

The GPU kernels are Triton (kernels/, mapped onto the package ldeq_fast.kernels): nothing is compiled for CUDA
at install time.  ``LDEQ_FAST_NO_EXT=1`` skips the native build (the package then runs its Triton kernels on
GPU and the PyTorch references on CPU, saying so).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("LDEQ_FAST_NO_EXT", "0").lower() in ("1", "true", "yes", "on"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "ldeq_fast._C", sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"]},
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
