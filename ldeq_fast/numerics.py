"""The numeric policy, in one place.

* The DEQ state z, the solver's history and its statistics are float32 — float64 when the model (or a
  solve's z0) is float64 — whatever autocast does.  A z0 of any floating dtype is accepted and cast; the
  cell ``f`` may compute in bf16 inside, its output is cast back to the state dtype.
* bf16 only where the hardware has it: a CPU without native bf16 (no AVX512-BF16 / AMX; e.g. AMD Zen 3)
  runs a bf16 convolution ~200x slower than fp32, so there an active bf16 autocast is switched off for the
  model's forward, with one warning (``LDEQ_FAST_ALLOW_SLOW_BF16=1`` keeps it, e.g. to check bf16 numerics).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from ldeq_fast.notices import warn_once


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The DEQ state's dtype for a model parameter (or z0) dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_state(z: torch.Tensor, dtype: torch.dtype, what: str = "z0") -> torch.Tensor:
    """``z`` in the state dtype ``dtype``; any floating dtype is accepted."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {z.dtype}")
    return z.to(dtype)


def in_state_dtype(f, dtype: torch.dtype):
    """``f`` with its output cast to the state dtype (f may compute in bf16 under autocast)."""
    def f_state(z):
        out = f(z)
        return out.to(dtype) if isinstance(out, torch.Tensor) else out

    return f_state


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """bf16 arithmetic is native on this device: CUDA (Ampere and newer), or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 / AMX)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def cpu_bf16_guard(device_type: str):
    """A context for the model's forward on ``device_type``: under a CPU bf16 autocast on a CPU without native
    bf16, autocast is disabled inside (fp32, with one warning); otherwise nothing changes."""
    if (device_type != "cpu" or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != torch.bfloat16 or native_bf16("cpu")
            or os.environ.get("LDEQ_FAST_ALLOW_SLOW_BF16") == "1"):
        return contextlib.nullcontext()
    warn_once("cpu-bf16", "ldeq_fast: this CPU has no native bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is "
                      "False), where a bf16 convolution is ~200x slower than fp32: the model runs in fp32 under "
              "this bf16 autocast")
    return torch.autocast("cpu", enabled=False)
