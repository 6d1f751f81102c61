"""Recurrence without recurrence (RwR): video landmark tracking with a still-image LDEQ.

Each stream keeps the previous frame's fixed point z*; the next frame's solve starts from it.

* ``per_frame``: every frame solved from zeros with the model's full solver (the baseline).
* ``warm``: z0 = previous z*, ``iters`` solver evaluations, then the model's extra f step (the published
  video inference: one iteration + the extra step = 2 cell evaluations per frame).
* ``prox``: solve the proximal map z = (f(z, x_t) + gamma * z*_{t-1}) / (1 + gamma) to ``tol`` from the
  previous z*: the fixed point is pulled toward the previous one by gamma, so the answer only moves as
  far as the new frame's evidence demands.

A reset policy guards against scene cuts and lost faces: when a warm/prox solve ends with a residual
above ``reset_residual`` or the landmarks jump by more than ``reset_displacement`` (fraction of the crop),
that stream's frame is solved again from zeros with the full solver.  Every stream's state and decision
is its own, and the solver is per-sample, so a stream gives the same answer alone or batched with others.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldeq_fast.deq import SolverSettings, deq_fixed_point
from ldeq_fast.model.layers import heatmaps_to_keypoints
from ldeq_fast.model.ldeq import LDEQ

MODES = ("per_frame", "warm", "prox")


@dataclass
class TrackerConfig:
    mode: str = "warm"
    iters: int = 1                      # warm: solver evaluations per frame (the extra step comes on top)
    gamma: float = 1.0                  # prox: pull toward the previous fixed point
    prox_tol: float = 1e-3
    prox_max_iters: int = 6
    reset_residual: float | None = None  # None disables a rule; the rel residual of peaky heatmaps is
    # large after any small shift, so the default relies on the landmark jump
    reset_displacement: float | None = 0.15

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"TrackerConfig: mode must be one of {MODES}, not {self.mode!r}")
        if self.iters < 1 or self.prox_max_iters < 1:
            raise ValueError("TrackerConfig: iteration counts must be >= 1")
        if self.gamma < 0:
            raise ValueError("TrackerConfig: gamma must be >= 0")


@dataclass
class FrameResult:
    keypoints: torch.Tensor        # (S, K, 2) in [0, 1) of the crop
    uncertainty: torch.Tensor      # (S, K)
    cell_evals: torch.Tensor       # (S,) cell evaluations spent on this frame (stem excluded)
    reset: torch.Tensor            # (S,) bool: the stream was (re)started cold on this frame
    residual: torch.Tensor         # (S,) final solver residual


class RwRTracker:
    """Runs a model over frames of many streams; ``step`` takes the frame of each listed stream."""

    def __init__(self, model: LDEQ, config: TrackerConfig | None = None):
        self.model = model.eval()
        self.cfg = config or TrackerConfig()
        self.state: dict = {}          # stream id -> (z_star (C,H,W), keypoints (K,2))

    def reset(self, stream=None) -> None:
        if stream is None:
            self.state.clear()
        else:
            self.state.pop(stream, None)

    @torch.no_grad()
    def step(self, images: torch.Tensor, streams: list) -> FrameResult:
        """images (S, 3, H, W) — one frame for each stream id in ``streams`` (ids unique in the call)."""
        m, c, tc = self.model, self.model.cfg, self.cfg
        if images.dim() != 4 or images.shape[0] != len(streams):
            raise ValueError(f"images must be (S, 3, H, W) with S = len(streams) = {len(streams)}, got "
                             f"{tuple(images.shape)}")
        if len(set(streams)) != len(streams):
            raise ValueError("stream ids in one step must be unique")
        m._check_inputs(images, None)
        S = images.shape[0]
        x = m.tail(images)
        extra = not c.take_one_less_inference_step
        full = m.solver_settings()
        known = torch.tensor([s in self.state for s in streams], device=images.device)
        z = torch.empty((S,) + m.z_shape(1)[1:], device=images.device, dtype=x.dtype)
        evals = torch.zeros(S, dtype=torch.long, device=images.device)
        residual = torch.zeros(S, device=images.device)
        cold = ~known if tc.mode != "per_frame" else torch.ones(S, dtype=torch.bool, device=images.device)

        if bool((~cold).any()):
            idx = (~cold).nonzero().flatten()
            z_prev = torch.stack([self.state[streams[i]][0] for i in idx.tolist()])
            fi = m.cell_fn(x[idx])
            if tc.mode == "warm":
                s = SolverSettings(**{**full.__dict__, "max_iter": tc.iters, "tol": 0.0})
                zw, st = deq_fixed_point(fi, z_prev, s, extra_step=extra)
                n_extra = int(extra)
            else:
                g = tc.gamma

                def prox(zz, fi=fi, z_prev=z_prev):
                    return (fi(zz) + g * z_prev) / (1 + g)

                s = SolverSettings(**{**full.__dict__, "max_iter": tc.prox_max_iters, "tol": tc.prox_tol})
                zw, st = deq_fixed_point(prox, z_prev, s, extra_step=False)
                n_extra = 0
            z[idx] = zw
            evals[idx] = st.nstep + n_extra
            residual[idx] = st.best_residual.to(residual.dtype)
            # reset rules: a solve that did not settle, or landmarks that jumped
            kp_new = heatmaps_to_keypoints(m.heatmaps_from_z(zw))[0]
            kp_old = torch.stack([self.state[streams[i]][1] for i in idx.tolist()])
            bad = torch.zeros(len(idx), dtype=torch.bool, device=images.device)
            if tc.reset_residual is not None:
                bad |= st.best_residual > tc.reset_residual
            if tc.reset_displacement is not None:
                bad |= (kp_new - kp_old).norm(dim=-1).mean(dim=-1) > tc.reset_displacement
            cold[idx[bad]] = True
        if bool(cold.any()):
            idx = cold.nonzero().flatten()
            zc, st = deq_fixed_point(m.cell_fn(x[idx]), torch.zeros_like(z[idx]), full, extra_step=extra)
            z[idx] = zc
            evals[idx] += st.nstep + int(extra)
            residual[idx] = st.best_residual.to(residual.dtype)
        kpts, spread, _ = heatmaps_to_keypoints(m.heatmaps_from_z(z))
        for i, s in enumerate(streams):
            self.state[s] = (z[i].clone(), kpts[i].clone())
        started_cold = cold if tc.mode != "per_frame" else ~known
        return FrameResult(keypoints=kpts, uncertainty=spread, cell_evals=evals, reset=started_cold,
                           residual=residual)
