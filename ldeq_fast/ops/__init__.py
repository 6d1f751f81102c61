"""Fused ops: one ``torch.library`` op each, ``torch.ops.ldeq_fast.<name>``, with its kernels registered per
dispatch key — CPU: the C++ kernel (csrc/cpu/<file>.cpp, ``TORCH_LIBRARY_IMPL``), CUDA: the Triton launcher of
the same name (kernels/<file>.py) — a fake impl for torch.compile, and its plain-PyTorch reference ``<name>_ref``
in the same module (ldeq_fast/ops/<file>.py).  The schemas are defined here, in Python, so the Triton path
works without the native extension.

``backend=`` (or ``LDEQ_FAST_BACKEND``) is the user's switch, not an op argument; ``resolve`` is the one
place its rules live:
  'torch'  the reference;
  'cpp'    the op on CPU tensors (needs ldeq_fast._C); on other tensors an error;
  'triton' the op on CUDA tensors; on CPU tensors the Triton launchers under TRITON_INTERPRET=1 (the
           interpreter, for tests; differentiable like the CUDA path), else an error;
  'auto'   'cpp' for CPU tensors, 'triton' for CUDA tensors; where that kernel is missing, the reference
           with one warning — or an error when ``LDEQ_FAST_REQUIRE_NATIVE=1`` (CI sets it).
What ran is recorded: ``recording_backends()`` collects ``{op: backend}`` of every op call inside it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import pathlib
import sys
import threading
from typing import Callable

import torch

from ldeq_fast import _ext
from ldeq_fast.config import BACKENDS
from ldeq_fast.notices import warn_once

NAMESPACE = "ldeq_fast"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_native() -> bool:
    """``LDEQ_FAST_REQUIRE_NATIVE=1``: a missing fused kernel is an error, never a fallback (CI)."""
    return os.environ.get("LDEQ_FAST_REQUIRE_NATIVE", "0").lower() in ("1", "true", "yes", "on")


def requested_backend(backend: str | None = None) -> str:
    b = backend or "auto"
    if b == "auto":
        b = os.environ.get("LDEQ_FAST_BACKEND", "auto") or "auto"
    if b not in BACKENDS:
        raise ValueError(f"unknown backend {b!r}: expected one of {BACKENDS}")
    return b


# --------------------------------------------------------------------------------------------------------
# op definition

def define(name: str, schema: str, *, fake: Callable, cuda: Callable):
    """Define ``ldeq_fast::<name>`` with ``schema`` (arguments and returns, without the name), register its
    fake impl and its CUDA kernel (a Triton launcher); the CPU kernel comes from ldeq_fast._C.  Returns the
    OpOverload.  An extension built from older sources that defined the op differently is refused."""
    qual = f"{NAMESPACE}::{name}"
    want = torch._C.parse_schema(qual + schema)
    packet = getattr(torch.ops.ldeq_fast, name, None) if _has_op(name) else None
    if packet is None:
        torch.library.define(qual, schema)
    elif str(packet.default._schema) != str(want):
        raise ImportError(f"ldeq_fast._C was built from older sources: it defines {packet.default._schema}, this "
                          f"ldeq_fast expects {want}; rebuild it (`pip install --no-build-isolation -e .`)")
    torch.library.register_fake(qual, fake)
    torch.library.register_kernel(qual, "cuda", cuda)
    _DEFINED.add(name)
    return getattr(torch.ops.ldeq_fast, name).default


_DEFINED: set[str] = set()


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{name}", "")
    except RuntimeError:
        return False
    return True


def has_cpu_kernel(name: str) -> bool:
    """The op's C++ kernel is registered (ldeq_fast._C is loaded and current)."""
    return (_ext.has_cpp() and _has_op(name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU"))


def cpu_kernels() -> dict[str, bool]:
    """Every fused op and whether its C++ kernel is registered."""
    from ldeq_fast.ops import anderson, heatmap, leaky_relu_group_norm  # noqa: F401, PLC0415 - defines the ops

    return {name: has_cpu_kernel(name) for name in sorted(_DEFINED)}


# --------------------------------------------------------------------------------------------------------
# backend resolution

def resolve(op: str, t: torch.Tensor, backend: str | None = None) -> str:
    """The backend op ``op`` runs on for tensor ``t`` ('cpp' | 'triton' | 'torch'), recorded as having run
    (inside torch.compile too: dynamo replays the record's dict update at every call of the graph)."""
    chosen = _resolve(op, t.device.type, requested_backend(backend), triton_interpret(), require_native())
    note(op, chosen)
    return chosen


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # torch.compile: a constant of the trace, not traced into
def _resolve(op: str, device: str, want: str, interpret: bool, strict: bool) -> str:
    if want == "torch":
        return "torch"
    if device == "cpu":
        if want in ("auto", "cpp") and has_cpu_kernel(op):
            return "cpp"
        if want == "triton":
            if interpret and triton_available():
                return "triton"
            raise RuntimeError(f"{op}: backend 'triton' runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
                               "the interpreter used by the tests); use 'cpp' or 'auto' on CPU")
        why = _ext.missing_reason() if not _ext.has_cpp() else (
            f"ldeq_fast._C has no kernel for {op} (built from older sources: rebuild it)")
        if want == "cpp" or strict:
            raise RuntimeError(f"{op}: no C++ kernel: {why}" + (" [LDEQ_FAST_REQUIRE_NATIVE=1]" if strict else ""))
    elif device == "cuda":
        if want == "cpp":
            raise RuntimeError(f"{op}: backend 'cpp' runs CPU tensors only; use 'auto' or 'triton' on CUDA")
        if triton_available():
            return "triton"
        why = "triton is not installed"
        if want == "triton" or strict:
            raise RuntimeError(f"{op}: no Triton kernel: {why}" + (" [LDEQ_FAST_REQUIRE_NATIVE=1]" if strict else ""))
    else:
        why = f"no fused kernel for {device} tensors"
        if want != "auto" or strict:
            raise RuntimeError(f"{op}: backend {want!r}: {why}")
    warn_once(f"fallback-{op}-{device}", f"ldeq_fast: {op} runs the PyTorch reference on {device} tensors ({why})")
    return "torch"


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """True when no autograd graph is recorded and nothing is being traced: then a kernel may be called
    directly, skipping the dispatcher and autograd layers (they cost tens of microseconds per call, which
    matter in no-grad fixed-point iterations on a GPU)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def run_kernel(chosen: str, op, launcher: Callable, interpreted: Callable, args: tuple):
    """A fused op's kernel on its resolved backend, 'cpp' or 'triton' (the caller runs the reference for
    'torch'): with no graph to record on CUDA the Triton ``launcher`` directly (``direct_call_ok``); on CPU
    tensors under the Triton interpreter ``interpreted``, the launcher with the op's autograd; else ``op``
    through the dispatcher (the C++ kernel on CPU, the Triton kernel on CUDA, with autograd and tracing)."""
    if chosen == "triton":
        if direct_call_ok(*(a for a in args if isinstance(a, torch.Tensor))):
            return launcher(*args)
        if args[0].device.type == "cpu":
            return interpreted(*args)
    return op(*args)


def interpreter_autograd(op: str, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """The Triton interpreter path (CPU tensors, TRITON_INTERPRET=1) with autograd.  CPU tensors dispatch to the
    C++ kernels, so this path calls the Triton launchers directly instead of through the op; to be differentiable
    the same way as the CUDA path, ``forward`` (the forward launcher) runs inside an autograd.Function with the
    op's own ``setup_context`` and ``backward`` (given the backward launcher) — what ``register_autograd``
    registers on the op.  Returns the Function's ``apply``."""
    fn = type(f"{op}_interpreted", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: forward(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })

    def apply(*args):
        if torch.compiler.is_compiling():
            raise RuntimeError(f"{op}: the Triton interpreter path (CPU tensors) cannot be compiled; compile "
                               "with backend 'cpp' or 'torch' on CPU, or 'triton' on CUDA")
        return fn.apply(*args)

    return apply


# --------------------------------------------------------------------------------------------------------
# what ran

_local = threading.local()


@contextlib.contextmanager
def recording_backends():
    """``with recording_backends() as ran:`` -> ``ran`` maps each op called inside to the backend(s) it ran on
    (a comma-separated string when one op ran on several)."""
    ran: dict[str, str] = {}
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(ran)
    try:
        yield ran
    finally:
        stack.pop()


@contextlib.contextmanager
def not_recorded():
    """Ops called inside are not part of what the enclosing ``recording_backends`` report (work beside the
    forward, such as measuring the CPU plan's candidates)."""
    stack = _local.__dict__.setdefault("stack", [])
    _local.stack = []
    try:
        yield
    finally:
        _local.stack = stack


def note(op: str, backend: str) -> None:
    for ran in getattr(_local, "stack", ()):
        have = ran.get(op)
        if have is None:
            ran[op] = backend
        elif backend not in have.split(","):
            ran[op] = ",".join(sorted({*have.split(","), backend}))


# --------------------------------------------------------------------------------------------------------
# Triton kernel modules

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
    sys.modules["ldeq_fast"].kernels = module  # as the import system does for a subpackage
    return module


def load_triton_kernels(name: str):
    """The Triton kernel module ``ldeq_fast.kernels.<name>`` (an install's, or a checkout's ``kernels/``)."""
    _kernels_package()
    return importlib.import_module(f"ldeq_fast.kernels.{name}")


def triton_launcher(module: str, fn: str) -> Callable:
    """A CUDA kernel for ``define``: the launcher ``fn`` of kernels/<module>.py, imported on first call (so
    importing an op module does not import triton)."""
    def kernel(*args):
        return getattr(load_triton_kernels(module), fn)(*args)

    kernel.__name__ = fn
    return kernel
