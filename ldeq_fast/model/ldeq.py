"""The LDEQ model: stem -> DEQ over the hourglass cell -> heatmaps -> keypoints."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ldeq_fast import numerics
from ldeq_fast.config import LDEQConfig, backward_depth, forward_depth
from ldeq_fast.deq import BackwardLog, SolverSettings, deq_fixed_point
from ldeq_fast.model import fast_path
from ldeq_fast.model.layers import Cell, Stem
from ldeq_fast.model.recompute import EpilogueRecompute, recompute_stem
from ldeq_fast.ops import recording_backends
from ldeq_fast.ops.heatmap import heatmap_keypoints, softargmax_heatmaps_ref

# ImageNet-normalised pixels lie in [-2.12, 2.64]; a float image with a value above this bound is taken for
# 0-255 pixels (any such image but a nearly black one), with room left for other normalisations
MAX_NORMALISED_PIXEL = 25.0


@dataclass
class LDEQOutput:
    keypoints: torch.Tensor              # (B, K, 2) in [0, 1): (x, y) / heatmap size
    uncertainty: torch.Tensor            # (B, K) RMS spread of each heatmap around its mean, / heatmap size
    uncertainty_published: torch.Tensor  # (B, K) the published formula (see heatmap_keypoints_ref)
    z_star: torch.Tensor                 # (B, z_width, H, W) detached, fp32 (fp64 model: fp64): next frame's z0
    heatmaps: torch.Tensor               # (B, K, H, W) normalised heatmaps (tracked in training)
    stats: Any = None                    # SolverStats of the forward solve (None in explicit mode)
    backends: dict = field(default_factory=dict)  # what ran: {op: 'cpp' | 'triton' | 'torch'} (and 'solver')
    extra: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return getattr(self, key)


def init_weights_like_published(module: nn.Module) -> None:
    """Xavier-normal conv weights, zero biases, unit/zero norm affines (the published initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DEQLayer(nn.Module):
    """Holds the cell (published name 'deq_layer.cell') and runs it explicitly or implicitly."""

    def __init__(self, cfg: LDEQConfig):
        super().__init__()
        norm = "bn" if (cfg.cell_use_bn_for_explicit and cfg.model_mode == "explicit") else "gn"
        self.cell = Cell(cfg, norm=norm)


@torch.compiler.disable   # torch.compile: the one host read of the checks runs outside the graph (one graph break)
def _check_image_values(images: torch.Tensor) -> None:
    """NaN/inf and 0-255 images, with one reduction read by one host sync."""
    lo, hi = torch.aminmax(images)
    lo, hi = torch.stack((lo, hi)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or inf")
    if hi > MAX_NORMALISED_PIXEL:
        raise ValueError(f"images have values up to {hi:.1f}: they look like 0-255 pixel values, but the model "
                         f"takes normalised images ((x / 255 - ImageNet mean) / std, in about [-2.2, 2.7]); "
                         f"use ldeq_fast.data.transforms.normalize_image")


class LDEQ(nn.Module):
    def __init__(self, cfg: LDEQConfig | None = None, **overrides):
        super().__init__()
        cfg = (cfg or LDEQConfig()).replace(**overrides) if overrides else (cfg or LDEQConfig())
        self.cfg = cfg
        self.tail = Stem(cfg.injection_width)
        self.deq_layer = DEQLayer(cfg)
        self.backward_log = BackwardLog()
        self.fast_path = fast_path.FastPathState()   # what of the fast path is applied to the modules now
        init_weights_like_published(self)
        self.apply_config()  # the layout is set before an optimizer or DDP sees the parameters

    # ------------------------------------------------------------------ helpers
    def z_shape(self, batch: int):
        c = self.cfg
        return (batch, c.z_width, c.heatmap_size, c.heatmap_size)

    @property
    def state_dtype(self) -> torch.dtype:
        """The DEQ state's dtype: float32, float64 for a float64 model (ldeq_fast/numerics.py)."""
        return numerics.state_dtype(next(self.parameters()).dtype)

    def zeros_z0(self, images: torch.Tensor) -> torch.Tensor:
        return images.new_zeros(self.z_shape(images.shape[0]), dtype=self.state_dtype)

    # ------------------------------------------------------------------ learned initial state
    @property
    def initial_state(self):
        """The learned initial state h (ldeq_fast/model/init_state.py) or None.  Attached, not owned: it is
        not in ``parameters()`` or ``state_dict()`` (published checkpoints load strictly; an optimizer or DDP
        over the model never sees it), but it follows ``.to()``, ``.float()``, ``.train()`` and deepcopy."""
        return self.__dict__.get("_initial_state")

    def set_initial_state(self, h) -> None:
        """Attach h (an ``InitialState`` fitted for this model) or detach it (None)."""
        if h is not None:
            c = self.cfg
            want = (c.injection_width, c.z_width, c.heatmap_size)
            got = (getattr(h, "in_channels", None), getattr(h, "out_channels", None), getattr(h, "heatmap_size", None))
            if got != want:
                raise ValueError(f"initial state for injection/state/heatmap sizes {got}; this model has {want}")
            if c.cell_norm == "none":
                raise ValueError("a learned initial state renders heatmap-like states; a model with cell_norm='none' "
                                 "keeps raw features in its state")
            p = next(self.parameters())
            h = h.to(device=p.device, dtype=p.dtype).train(self.training)
            fast_path.set_epilogue_backend(h, self.cfg.backend)
        object.__setattr__(self, "_initial_state", h)   # not nn.Module.__setattr__: no submodule
        self.__dict__.pop("initial_state_info", None)

    def uses_initial_state(self) -> bool:
        """z0 = h(x) when no z0 is given: an init is attached and the model is in eval mode (training keeps
        the published zeros: the cell is changing under it)."""
        return self.initial_state is not None and not self.training

    def initial_z0(self, injection: torch.Tensor) -> torch.Tensor:
        """The solve's default start for an injection x: h(x) (ldeq_fast/model/init_state.py) when
        ``uses_initial_state()``, zeros otherwise; in the state dtype."""
        if not self.uses_initial_state():
            return injection.new_zeros(self.z_shape(injection.shape[0]), dtype=self.state_dtype)
        return numerics.to_state(self.initial_state(injection), self.state_dtype).contiguous()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.initial_state is not None:
            self.initial_state._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.initial_state is not None:
            self.initial_state.train(mode)
        return self

    def solver_settings(self, max_iters: int | None = None, *, backward: bool = False, **changes) -> SolverSettings:
        """The forward solve's settings (``max_iters`` or the config's, through ``forward_depth``: a random
        depth when training with stochastic_max_iters), or with ``backward=True`` the implicit backward's
        (``backward_depth``: deterministic, the rule the compat layer shares)."""
        c = self.cfg
        mi = c.max_iters if max_iters is None else int(max_iters)
        if backward:
            mi = backward_depth(mi, c.stochastic_max_iters, c.backward_max_iters)
        else:
            mi = forward_depth(mi, c.stochastic_max_iters, self.training)
        return SolverSettings.from_config(c, mi, **changes)

    # ------------------------------------------------------------------ the stages of forward
    # forward = check_inputs -> injection -> initial_z0 -> solve -> read_out; every tool that runs the model
    # in pieces (tracker, accuracy, fit-init, compat, streaming, export) composes these.

    def check_inputs(self, images: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """Check a batch of images (and z0) and return the images in the model's dtype.

        Any floating dtype is accepted and cast to the weights' dtype (fp16/bf16 -> fp32 is exact; fp64 ->
        fp32 rounds far below pixel noise; autocast then picks the compute dtype as usual).  One reduction,
        read with one host sync, catches both NaN/inf and images that are plainly 0-255 pixel values."""
        c = self.cfg
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, 3, {c.im_size}, {c.im_size}), got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != c.im_size or images.shape[3] != c.im_size:
            raise ValueError(f"images must have shape (B, 3, {c.im_size}, {c.im_size}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised), got {images.dtype}: convert "
                            f"uint8 RGB with ldeq_fast.data.transforms.normalize_image")
        weight = next(self.tail.parameters())
        if images.device != weight.device:
            raise ValueError(f"images are on device {images.device} but the model is on {weight.device}: "
                             f"move them with images.to({str(weight.device)!r})")
        if z0 is not None:
            want = self.z_shape(images.shape[0])
            if tuple(z0.shape) != want:
                raise ValueError(f"z0 must have shape {want}, got {tuple(z0.shape)}")
            if z0.device != weight.device:
                raise ValueError(f"z0 is on device {z0.device} but the model is on {weight.device}")
        images = images.to(weight.dtype)
        _check_image_values(images)
        return images

    def injection(self, images: torch.Tensor) -> torch.Tensor:
        """The stem's output x for checked images: the cell's input injection (in the fast path's layout)."""
        self.apply_config()
        images = images.contiguous(memory_format=self.fast_path.memory_format)
        return recompute_stem(self.tail, images) if fast_path.lean_training(self.cfg) else self.tail(images)

    def cell_fn(self, injection: torch.Tensor):
        """f(z) = cell(z, x) for one injection x, the map the solver iterates (the injection's share of the
        first conv computed once on the fast path; the state kept fp32/fp64 under bf16 autocast)."""
        self.apply_config()
        cell = self.deq_layer.cell
        if not torch.compiler.is_compiling():
            # measuring (or reading the cached plan from disk) is host work dynamo cannot trace: a compiled
            # forward runs the plan the last eager call applied (or the fixed choices), recorded in extra
            fast_path.plan_cpu(self, injection)
        term = cell.injection_term(injection) if fast_path.reordered_math(self.cfg) else None
        return numerics.in_state_dtype(lambda z: cell(z, injection, term), self.state_dtype)

    def solve(self, injection: torch.Tensor, z0: torch.Tensor | None = None, settings: SolverSettings | None = None,
              *, max_iters: int | None = None, mode: str | None = None, extra_step: bool | None = None,
              proximal: tuple[float, torch.Tensor] | None = None):
        """Solve z* = f(z*, x) for an injection x from ``z0`` (None: ``initial_z0``; any float dtype, cast to
        the state dtype).  Returns ``(z, stats)``; ``stats`` is None in explicit mode.

        ``settings``: the forward solver's (default ``solver_settings(max_iters)``); the implicit backward's
        depth follows ``max_iters`` or ``settings.max_iter``; in explicit mode ``max_iters`` (default
        ``cfg.explicit_depth``) unrolled steps.  ``extra_step``: apply f once more after the solve (default: the
        config's, not ``take_one_less_inference_step``).  ``proximal=(gamma, anchor)`` solves the proximal
        map z = (f(z) + gamma * anchor) / (1 + gamma) instead (RwR's strict form; no extra step)."""
        c = self.cfg
        with EpilogueRecompute() if fast_path.lean_training(c) else contextlib.nullcontext():
            return self._solve(injection, z0, settings, max_iters, mode or c.model_mode, extra_step, proximal)

    def _solve(self, injection, z0, settings, max_iters, mode, extra_step, proximal):
        c = self.cfg
        z0 = self.initial_z0(injection) if z0 is None else numerics.to_state(z0, self.state_dtype)
        f = self.cell_fn(injection)
        if mode == "explicit":
            z = z0
            for _ in range(c.explicit_depth if max_iters is None else int(max_iters)):
                z = f(z)
            return z, None
        if mode != "implicit":
            raise ValueError(f"mode must be 'implicit' or 'explicit', not {mode!r}")
        bwd = self.solver_settings(max_iters if settings is None else settings.max_iter, backward=True)
        settings = settings or self.solver_settings(max_iters)
        if proximal is not None:
            gamma, anchor = proximal
            cell_f = f

            def f(z):
                return (cell_f(z) + gamma * anchor) / (1 + gamma)

            extra_step = False
        elif extra_step is None:
            extra_step = not c.take_one_less_inference_step
        return deq_fixed_point(f, z0, settings, grad_mode=c.grad_mode, extra_step=extra_step, backward_settings=bwd,
                               phantom_steps=c.phantom_steps, phantom_damping=c.phantom_damping,
                               log=self.backward_log)

    def heatmaps_from_z(self, z: torch.Tensor) -> torch.Tensor:
        """The keypoint heatmaps held in a state z (its first n_keypoints channels)."""
        c = self.cfg
        heat = z[:, : c.n_keypoints]
        if c.cell_norm == "none":  # the cell outputs raw features: normalise them here
            heat = softargmax_heatmaps_ref(heat, c.softargmax_beta)
        return heat

    def keypoints_from_heatmaps(self, heat: torch.Tensor):
        """(keypoints, spread, published uncertainty) of heatmaps: the fused keypoint head on the fast path,
        the reference (``heatmap_keypoints_ref``) with backend 'torch'."""
        return heatmap_keypoints(heat, backend=self.cfg.backend)

    def read_out(self, z: torch.Tensor, stats=None) -> LDEQOutput:
        """The output of a solved state z: heatmaps, keypoints, uncertainties (and the solve's stats)."""
        heat = self.heatmaps_from_z(z)
        kpts, spread, published = self.keypoints_from_heatmaps(heat)
        out = LDEQOutput(keypoints=kpts, uncertainty=spread, uncertainty_published=published,
                         z_star=z.detach(), heatmaps=heat, stats=stats)
        if self.fast_path.cpu_plan is not None:
            plan = self.fast_path.cpu_plan.describe()
            if torch.compiler.is_compiling():   # traced: the split convs' adds are inductor's, not oneDNN post-ops
                plan.update(post_add=0, compiled=True)
            out.extra["cpu_plan"] = plan
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, z0: torch.Tensor | None = None, mode: str | None = None,
                max_iters: int | None = None, solver: SolverSettings | None = None) -> LDEQOutput:
        """Landmarks of a batch of normalised images (B, 3, S, S).  ``z0``: the solve's start (a previous
        frame's ``z_star`` for RwR; None: the learned initial state or zeros); ``max_iters`` or a whole
        ``solver`` (SolverSettings) override the config's solver."""
        images = self.check_inputs(images, z0)
        return self.forward_unchecked(images, z0, mode, max_iters, solver)

    def forward_unchecked(self, images: torch.Tensor, z0: torch.Tensor | None = None, mode: str | None = None,
                          max_iters: int | None = None, solver: SolverSettings | None = None) -> LDEQOutput:
        """``forward`` without ``check_inputs``, whose NaN test reads a value on the host: with a
        ``fixed_iters`` solver nothing here syncs, so it can be captured (ldeq_fast/streaming.py)."""
        start = "given" if z0 is not None else "learned" if self.uses_initial_state() else "zeros"
        with recording_backends() as ran, numerics.cpu_bf16_guard(images.device.type):
            x = self.injection(images)
            z, stats = self.solve(x, z0, solver, max_iters=max_iters, mode=mode)
            out = self.read_out(z, stats)
        out.backends = dict(sorted(ran.items()))
        out.extra["z0"] = start
        return out

    # ------------------------------------------------------------------ the fast path (model/fast_path.py)
    def apply_config(self) -> None:
        """Apply ``cfg``'s fast-path switch now (forward does it lazily after ``model.cfg`` is replaced):
        backend 'torch' = eager cell ops and NCHW weights; otherwise fused cell epilogues and, with
        cfg.channels_last, NHWC weights (the activations follow the weights' layout)."""
        fast_path.apply_config(self)
