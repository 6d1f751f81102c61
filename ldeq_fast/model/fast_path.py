"""The fast path's state, kept beside the model rather than in it.

The same weights run two ways.  Backend 'torch' is the reference: eager cell ops, NCHW weights.  Any other
backend is the fast path: fused cell epilogues (ldeq_fast/ops), rewrites that give the same values rounded
differently (1x1 convs over concatenations as sums of partial convs, NHWC convolutions with
``cfg.channels_last``) and, in CPU fp32 inference, the measured CPU plan (ldeq_fast/model/cpu_tuning.py).
``FastPathState`` remembers what was last applied to a model's modules, so switching ``model.cfg`` re-lays
out the weights once, not at every call.
"""
from __future__ import annotations

import torch
from torch import nn

from ldeq_fast.model.layers import ConvBlock, HeatmapNorm


class FastPathState:
    """What is applied to one model's modules now: the epilogue backend, the conv weights' memory format, the
    CPU plan (None: the fixed choices)."""

    def __init__(self):
        self.epilogue_backend: str | None = None
        self.memory_format = torch.contiguous_format
        self.cpu_plan = None


def reordered_math(cfg) -> bool:
    """The fast path's rewrites (same values, rounded differently) are on for every backend but the reference,
    whatever the solver semantics (published-semantics runs stay within ~1e-3 heatmap px of the plain path)."""
    return cfg.backend != "torch"


def lean_training(cfg) -> bool:
    """Training stores recipes instead of activations (ldeq_fast/model/recompute.py) on the fast path."""
    return cfg.backend != "torch" and cfg.train_recompute and torch.is_grad_enabled()


def set_epilogue_backend(module: nn.Module, backend: str) -> None:
    """The backend of every fused conv epilogue and heatmap norm in ``module``."""
    for mod in module.modules():
        if isinstance(mod, (ConvBlock, HeatmapNorm)):
            mod.epilogue_backend = backend


def apply_config(model) -> None:
    """Apply ``model.cfg``'s fast-path switch to the model's modules (a no-op when already applied): the
    epilogue backend of the cell and the learned initial state, the weights' memory format (the activations
    follow it), and no measured CPU plan off the fast path."""
    state: FastPathState = model.fast_path
    cfg = model.cfg
    if state.epilogue_backend != cfg.backend:
        set_epilogue_backend(model.deq_layer.cell, cfg.backend)
        if model.initial_state is not None:
            set_epilogue_backend(model.initial_state, cfg.backend)
        state.epilogue_backend = cfg.backend
    if not reordered_math(cfg) and state.cpu_plan is not None:
        use_cpu_plan(model, None)
    fmt = torch.channels_last if reordered_math(cfg) and cfg.channels_last else torch.contiguous_format
    # (the learned initial state keeps NCHW weights: it works in NCHW, the solver state's order)
    if state.memory_format != fmt:
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.data = mod.weight.data.contiguous(memory_format=fmt)
        state.memory_format = fmt


def plan_cpu(model, injection: torch.Tensor) -> None:
    """CPU inference on the fast path: each cell convolution's layout and post-op as measured for this machine
    and batch (ldeq_fast/model/cpu_tuning.py); elsewhere the fixed choices."""
    from ldeq_fast.model import cpu_tuning  # measuring needs the model's shapes: imported on first use

    use = reordered_math(model.cfg) and cpu_tuning.applies(model, injection)
    use_cpu_plan(model, cpu_tuning.plan_for(model, injection.shape[0]) if use else None)


def use_cpu_plan(model, plan) -> None:
    """Run the cell with ``plan`` (None: the fixed choices) from now on."""
    state: FastPathState = model.fast_path
    if plan is not state.cpu_plan:
        from ldeq_fast.model import cpu_tuning

        cpu_tuning.apply_plan(model.deq_layer.cell, plan)
        state.cpu_plan = plan
