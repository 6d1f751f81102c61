"""Fused ops.  Each op module holds the public function, its pure-PyTorch reference (``*_ref``) and the
dispatch to its Triton / C++ / CUDA kernels.  ``pick_backend`` is the one place dispatch rules live; the
helpers every op module shares (kernel loading, C++ op presence, the direct-call rule) are here too."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

import torch

from ldeq_fast import _ext

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(backend: str | None = None) -> str:
    b = backend or "auto"
    if b == "auto":
        b = os.environ.get("LDEQ_FAST_BACKEND", "auto") or "auto"
    if b not in BACKENDS:
        raise ValueError(f"unknown backend {b!r}: expected one of {BACKENDS}")
    return b


def pick_backend(t: torch.Tensor, backend: str | None = None, supports: tuple = ("triton", "cpp", "cuda")) -> str:
    """Backend for an op on tensor ``t``: the requested one if it can run there, else the fastest
    available (CUDA tensors: cuda > triton; CPU tensors: cpp, or triton under TRITON_INTERPRET=1 when
    forced), else the PyTorch reference with one warning."""
    want = requested_backend(backend)
    if want == "torch":
        return "torch"
    on_cuda = t.is_cuda
    usable = []
    if "cuda" in supports and on_cuda and _ext.has_cuda():
        usable.append("cuda")
    if "triton" in supports and triton_available() and (on_cuda or triton_interpret()):
        usable.append("triton")
    if "cpp" in supports and not on_cuda and _ext.has_cpp():
        usable.append("cpp")
    if want != "auto":
        if want in usable:
            return want
        _ext.warn_once(f"{want}-{t.device.type}",
                       f"ldeq_fast: backend {want!r} cannot run on {t.device.type} tensors here "
                       f"({_ext.missing_reason() if want in ('cpp', 'cuda') else 'triton needs a GPU or TRITON_INTERPRET=1'}); "
                       "using the PyTorch reference")
        return "torch"
    if on_cuda:
        for b in ("cuda", "triton"):
            if b in usable:
                return b
    elif "cpp" in usable:
        return "cpp"
    if ("cpp" in supports and not on_cuda) or ("cuda" in supports and on_cuda):
        _ext.warn_once(f"fallback-{t.device.type}", f"ldeq_fast: no fused kernel available for {t.device.type} "
                       f"tensors ({_ext.missing_reason()}); using the PyTorch reference")
    return "torch"


_PKG = pathlib.Path(__file__).resolve().parents[1]  # the imported ldeq_fast package


def _kernels_package():
    """The package ``ldeq_fast.kernels``.  An install maps ``kernels/`` onto it (setup.py); a source checkout
    used without installing it (PYTHONPATH=checkout, e.g. on a GPU machine with LDEQ_FAST_NO_EXT=1) has
    ``kernels/`` beside the package instead, which is then registered under the same name, so the kernel
    modules import each other the same way in both cases."""
    name = "ldeq_fast.kernels"
    if name in sys.modules:
        return sys.modules[name]
    beside = _PKG.parent / "kernels" / "__init__.py"
    if (_PKG / "kernels" / "__init__.py").is_file() or not beside.is_file():
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, beside, submodule_search_locations=[str(beside.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    import ldeq_fast

    ldeq_fast.kernels = module
    return module


def load_triton_kernels(name: str):
    """The Triton kernel module ``ldeq_fast.kernels.<name>`` (an install's, or a checkout's ``kernels/``)."""
    _kernels_package()
    return importlib.import_module(f"ldeq_fast.kernels.{name}")


def cpp_ops_present(*names: str) -> bool:
    """True when ldeq_fast._C is loaded and registers every op in ``names``; warns (once) when the
    extension is loaded but predates them (rebuild it).  A name may require arguments of the op's current
    schema: ``"op(arg1,arg2)"``."""
    if not _ext.has_cpp():
        return False

    def present(spec: str) -> bool:
        name, _, args = spec.partition("(")
        if not hasattr(torch.ops.ldeq_fast, name):
            return False
        have = {a.name for a in getattr(torch.ops.ldeq_fast, name).default._schema.arguments}
        return all(a in have for a in args.rstrip(")").split(",") if a)

    missing = [n for n in names if not present(n)]
    if missing:
        _ext.warn_once(f"stale-{missing[0]}", f"ldeq_fast._C lacks {missing} (built from older sources); "
                       "rebuild it: `python setup.py build_ext --inplace`.  Using the other backends.")
    return not missing


def direct_call_ok(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph is recorded and nothing is being traced: the public functions then
    call the kernels directly, skipping the custom-op and autograd layers (tens of microseconds per call,
    which matter in the no-grad fixed-point iterations)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
