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


def load_triton_kernels(name: str):
    """The Triton kernel module ``ldeq_fast.kernels.<name>``.  In a source checkout that was not
    installed, ``kernels/`` (mapped onto ``ldeq_fast.kernels`` by setup.py) is loaded from beside the
    package under the same module name."""
    full = f"ldeq_fast.kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name not in ("ldeq_fast.kernels", full):
            raise
    path = pathlib.Path(__file__).resolve().parents[2] / "kernels" / f"{name}.py"
    if not path.is_file():
        raise ModuleNotFoundError(f"Triton kernels {full!r} are not installed and {path} does not exist")
    spec = importlib.util.spec_from_file_location(full, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


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
