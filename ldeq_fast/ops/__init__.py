"""Fused ops.  Each op module holds the public function, its pure-PyTorch reference (``*_ref``) and the
dispatch to its Triton / C++ / CUDA kernels.  ``pick_backend`` is the one place dispatch rules live."""
from __future__ import annotations

import os

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
