"""Fused LeakyReLU -> GroupNorm: ``group_norm(leaky_relu(x, slope), num_groups, weight, bias, eps)``,
optionally ``+ residual``.

The model's ConvBlock normalises *after* the activation; fusing the two reads x once for the statistics
and once for the output, and the backward recomputes the activation from x instead of keeping it.  A
residual connection after the block (the hourglass's ``same(y) + y``) is added in the output pass, which
saves the separate add's three passes over memory; its gradient is the output's.

The op ``torch.ops.ldeq_fast.leaky_relu_group_norm`` -> (out, mean, rstd) and its backward op
``leaky_relu_group_norm_backward``: CPU kernels in csrc/cpu/leaky_relu_group_norm.cpp, CUDA kernels in
kernels/leaky_relu_group_norm.py (Triton), autograd registered on the forward op; the reference is
``leaky_relu_group_norm_ref`` below.

Layouts: NCHW-contiguous and channels_last inputs are used as they are and the output has the input's
memory format; any other strides are made contiguous first.  Statistics are float32 (float64 for
float64 input); float32, float64, bfloat16 and float16 inputs are supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldeq_fast.ops import (
    define,
    interpreter_autograd,
    resolve,
    run_kernel,
    triton_launcher,
)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OP = "leaky_relu_group_norm"


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-group mean / rstd for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def leaky_relu_group_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                              num_groups: int, eps: float = 1e-5, slope: float = 0.01,
                              residual: torch.Tensor | None = None) -> torch.Tensor:
    """The eager PyTorch composition (the oracle of the tests)."""
    out = F.group_norm(F.leaky_relu(x, slope), num_groups, weight, bias, eps)
    return out if residual is None else out + residual


def _check(x, weight, bias, num_groups, eps, residual=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{_OP}: num_groups must be a positive int, got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups:
        raise ValueError(f"{_OP}: num_groups={num_groups} does not divide the channel count C={C}")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != (C,):
            raise ValueError(f"{_OP}: {name} must have shape ({C},) for C={C}, got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"{_OP}: {name} must be floating point, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {p.device} but x is on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"{_OP}: eps must be >= 0, got {eps}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{_OP}: residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"{_OP}: residual must match x in shape, dtype and device: got "
                             f"{tuple(residual.shape)} {residual.dtype} on {residual.device} for x "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")


def _dense(x: torch.Tensor) -> torch.Tensor:
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly ``x``'s strides (the kernels address the residual through x's layout)."""
    if t.stride() == x.stride():
        return t
    return t.new_empty_strided(x.shape, x.stride()).copy_(t)


# --------------------------------------------------------------------------------------------------------
# the ops

def _forward_fake(x, weight, bias, num_groups, eps, slope, residual=None):
    acc = stats_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(x.shape[0], num_groups, dtype=acc), \
        x.new_empty(x.shape[0], num_groups, dtype=acc)


def _backward_fake(grad_out, x, weight, mean, rstd, num_groups, slope):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)

_LAUNCH, _LAUNCH_BACKWARD = triton_launcher(_OP, _OP), triton_launcher(_OP, f"{_OP}_backward")

FORWARD = define(_OP, "(Tensor x, Tensor weight, Tensor bias, int num_groups, float eps, float slope, "
                 "Tensor? residual=None) -> (Tensor, Tensor, Tensor)", fake=_forward_fake,
                 cuda=_LAUNCH)
BACKWARD = define(f"{_OP}_backward", "(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, "
                  "int num_groups, float slope) -> (Tensor, Tensor, Tensor)", fake=_backward_fake,
                  cuda=_LAUNCH_BACKWARD)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, num_groups, _eps, slope, residual = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)  # not the residual: its gradient is grad_out itself
    ctx.num_groups, ctx.slope, ctx.has_residual = num_groups, slope, residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward_with(backward_kernel):
    """The backward of the op, running ``backward_kernel`` (the backward op, or its Triton launcher on the
    interpreter path)."""
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = backward_kernel(grad_out, x, weight, mean, rstd, ctx.num_groups, ctx.slope)
        return dx, dw, db, None, None, None, (grad_out if ctx.has_residual else None)

    return backward


torch.library.register_autograd(f"ldeq_fast::{_OP}", _backward_with(BACKWARD), setup_context=_setup_context)
_INTERPRETED = interpreter_autograd(_OP, _LAUNCH, _setup_context,
                                    _backward_with(_LAUNCH_BACKWARD))


# --------------------------------------------------------------------------------------------------------
# public API

def leaky_relu_group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          num_groups: int, eps: float = 1e-5, slope: float = 0.01, *,
                          residual: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``F.group_norm(F.leaky_relu(x, slope), num_groups, weight, bias, eps) [+ residual]`` in one fused op.

    x: (N, C, H, W) float32 / float64 / bfloat16 / float16, NCHW-contiguous or channels_last (the output
    keeps the memory format).  weight, bias: (C,) or None (then 1 / 0).  residual: None or a tensor of x's
    shape and dtype, added in the output pass.  Differentiable in x, weight, bias and residual.
    ``backend`` ('auto' | 'torch' | 'triton' | 'cpp'; default: env LDEQ_FAST_BACKEND, else auto): see
    ``ldeq_fast.ops.resolve``.
    """
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        C = x.shape[1]
        if weight is None:
            weight = torch.ones(C, device=x.device, dtype=stats_dtype(x.dtype))
        if bias is None:
            bias = torch.zeros(C, device=x.device, dtype=stats_dtype(x.dtype))
    _check(x, weight, bias, num_groups, eps, residual)
    chosen = resolve(_OP, x, backend)
    if chosen == "torch":
        return leaky_relu_group_norm_ref(x, weight, bias, num_groups, eps, slope, residual)
    x = _dense(x)
    if residual is not None:
        residual = _like(residual, x)
    args = (x, weight, bias, int(num_groups), float(eps), float(slope), residual)
    return run_kernel(chosen, FORWARD, _LAUNCH, _INTERPRETED, args)[0]
