"""Recurrence without recurrence (RwR): video landmark tracking with a still-image LDEQ.

Each stream keeps the previous frame's fixed point z*; the next frame's solve starts from it.

* ``per_frame``: every frame solved from zeros with the model's full solver (the baseline).
* ``warm``: z0 = previous z*, ``iters`` solver evaluations, then the model's extra f step (the published
  video inference: one iteration + the extra step = 2 cell evaluations per frame).
* ``prox``: solve the proximal map z = (f(z, x_t) + gamma * z*_{t-1}) / (1 + gamma) to ``tol`` from the
  previous z*: the fixed point is pulled toward the previous one by gamma, so the answer only moves as
  far as the new frame's evidence demands.

Crops follow a per-frame box, so consecutive crops differ by a small shift and scale.  When ``step`` is
given each frame's crop affine, the previous z* is resampled into the current crop's coordinates before it
is used (``align``): otherwise a warm start carries the box jitter straight into the landmarks.  ``motion``
also moves it on by the landmarks' motion over the last frame (a translation or a similarity fitted in
frame pixels), so the prox pull aims where the face is going rather than where it was.

A reset policy guards against scene cuts, lost faces and bad numbers: when a warm/prox solve diverges (NaN/inf
or a residual blow-up, ``SolverStats.diverged``), ends with a residual above ``reset_residual`` or moves the
landmarks by more than ``reset_displacement`` (fraction of the crop), that stream's frame is solved again
from zeros with the full solver.  A cold solve that itself diverges is reported (``FrameResult.diverged``) and
is never kept as the stream's state: the stream's next frame starts cold again.  Every stream's state and decision
is its own, and the solver is per-sample, so a stream gives the same answer alone or batched with others.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldeq_fast.config import check_field_types
from ldeq_fast.data.transforms import apply_affine, invert_affine
from ldeq_fast.model.ldeq import LDEQ

MODES = ("per_frame", "warm", "prox")
MOTIONS = ("none", "translation", "similarity")


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
    align: bool = True                  # resample the previous z* into the current crop (needs affines)
    motion: str = "none"                # and move it by the landmarks' last motion: none|translation|similarity

    def __post_init__(self):
        check_field_types(self)
        if self.mode not in MODES:
            raise ValueError(f"TrackerConfig: mode must be one of {MODES}, not {self.mode!r}")
        if self.iters < 1 or self.prox_max_iters < 1:
            raise ValueError("TrackerConfig: iteration counts must be >= 1")
        if self.gamma < 0:
            raise ValueError("TrackerConfig: gamma must be >= 0")
        if self.motion not in MOTIONS:
            raise ValueError(f"TrackerConfig: motion must be one of {MOTIONS}, not {self.motion!r}")


@dataclass
class _Stream:
    z: torch.Tensor                  # (C, H, W) the last fixed point, in its frame's crop
    keypoints: torch.Tensor          # (K, 2) in [0, 1) of that crop
    affine: torch.Tensor | None      # (2, 3) that frame's frame -> crop affine
    frame_kpts: torch.Tensor | None  # (K, 2) the landmarks in frame pixels (float64)
    motion: torch.Tensor | None      # (2, 3) frame-pixel affine from the frame before's landmarks to these


@dataclass
class FrameResult:
    keypoints: torch.Tensor        # (S, K, 2) in [0, 1) of the crop
    uncertainty: torch.Tensor      # (S, K)
    cell_evals: torch.Tensor       # (S,) cell evaluations spent on this frame (stem excluded)
    reset: torch.Tensor            # (S,) bool: the stream was (re)started cold on this frame
    residual: torch.Tensor         # (S,) final solver residual
    diverged: torch.Tensor         # (S,) bool: even the cold solve diverged: these landmarks are not to be
    # trusted, and the stream keeps no state (its next frame starts cold)


def _compose(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The affine x -> A(B(x)) of (...,2,3) affines."""
    lin = A[..., :2] @ B[..., :2]
    return torch.cat((lin, A[..., :2] @ B[..., 2:] + A[..., 2:]), dim=-1)


def fit_motion(src: torch.Tensor, dst: torch.Tensor, kind: str) -> torch.Tensor:
    """Least-squares (2,3) affine of ``kind`` ('translation' | 'similarity') taking points src (K,2) to dst."""
    ms, md = src.mean(0), dst.mean(0)
    if kind == "translation":
        lin = torch.eye(2, dtype=src.dtype)
    else:
        a, b = src - ms, dst - md
        n = (a * a).sum().clamp_min(1e-12)
        cos = (a * b).sum() / n                                   # scale * cos(angle)
        sin = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum() / n   # scale * sin(angle)
        lin = torch.stack((torch.stack((cos, -sin)), torch.stack((sin, cos))))
    return torch.cat((lin, (md - lin @ ms)[:, None]), dim=1)


def align_state(z_prev: torch.Tensor, prev_to_now: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Resample states (S,C,H,W) of the previous crops into the current ones.  ``prev_to_now`` (S,2,3) maps
    previous-crop pixels to current-crop pixels; heatmap index i sits at crop pixel i * crop_size / H (the
    keypoint convention).  Bilinear, edge values outside the previous crop."""
    S, _, H, W = z_prev.shape
    k = crop_size / H
    now_to_prev = invert_affine(prev_to_now).to(z_prev.dtype)
    ii = torch.arange(W, device=z_prev.device, dtype=z_prev.dtype)
    jj = torch.arange(H, device=z_prev.device, dtype=z_prev.dtype)
    gy, gx = torch.meshgrid(jj * k, ii * k, indexing="ij")
    pts = torch.stack((gx, gy), dim=-1).view(1, H * W, 2)                       # current-crop pixels
    src = pts @ now_to_prev[:, :, :2].transpose(1, 2) + now_to_prev[:, None, :, 2]  # previous-crop pixels
    grid = torch.stack((src[..., 0] / k * 2 / (W - 1) - 1, src[..., 1] / k * 2 / (H - 1) - 1), dim=-1)
    return F.grid_sample(z_prev, grid.view(S, H, W, 2), mode="bilinear", padding_mode="border",
                         align_corners=True)


class RwRTracker:
    """Runs a model over frames of many streams; ``step`` takes the frame of each listed stream."""

    def __init__(self, model: LDEQ, config: TrackerConfig | None = None):
        self.model = model.eval()
        self.cfg = config or TrackerConfig()
        self.state: dict[object, _Stream] = {}

    def reset(self, stream=None) -> None:
        if stream is None:
            self.state.clear()
        else:
            self.state.pop(stream, None)

    @torch.no_grad()
    def step(self, images: torch.Tensor, streams: list, affines=None) -> FrameResult:
        """images (S, 3, H, W) — one frame for each stream id in ``streams`` (ids unique in the call);
        ``affines`` (S, 2, 3), optional: each frame's frame -> crop pixel affine, for ``align``."""
        m, c, tc = self.model, self.model.cfg, self.cfg
        if images.dim() != 4 or images.shape[0] != len(streams):
            raise ValueError(f"images must be (S, 3, H, W) with S = len(streams) = {len(streams)}, got "
                             f"{tuple(images.shape)}")
        if len(set(streams)) != len(streams):
            raise ValueError("stream ids in one step must be unique")
        images = m.check_inputs(images)
        S = images.shape[0]
        if affines is not None:
            affines = torch.as_tensor(affines, dtype=torch.float64)
            if tuple(affines.shape) != (S, 2, 3) or not bool(torch.isfinite(affines).all()):
                raise ValueError(f"affines must be finite with shape ({S}, 2, 3), got {tuple(affines.shape)}")
        x = m.injection(images)
        full = m.solver_settings()
        known = torch.tensor([s in self.state for s in streams], device=images.device)
        z = torch.empty((S,) + m.z_shape(1)[1:], device=images.device, dtype=m.state_dtype)
        evals = torch.zeros(S, dtype=torch.long, device=images.device)
        residual = torch.zeros(S, device=images.device)
        diverged = torch.zeros(S, dtype=torch.bool, device=images.device)
        cold = ~known if tc.mode != "per_frame" else torch.ones(S, dtype=torch.bool, device=images.device)

        if bool((~cold).any()):
            idx = (~cold).nonzero().flatten()
            prev = [self.state[streams[i]] for i in idx.tolist()]
            z_prev = torch.stack([p.z for p in prev])
            kp_old = torch.stack([p.keypoints for p in prev])
            if tc.align and affines is not None and all(p.affine is not None for p in prev):
                # previous crop pixels -> frame (-> moved on by the landmarks' last motion) -> current crop
                to_frame = invert_affine(torch.stack([p.affine for p in prev]))
                if tc.motion != "none":
                    to_frame = torch.stack([t if p.motion is None else _compose(p.motion, t)
                                            for p, t in zip(prev, to_frame)])
                rel = _compose(affines[idx.cpu()], to_frame)
                z_prev = align_state(z_prev, rel.to(z_prev.device), c.im_size)
                kp_old = apply_affine(kp_old * c.im_size, rel) / c.im_size
            if tc.mode == "warm":
                zw, st = m.solve(x[idx], z_prev, m.solver_settings(tc.iters, tol=0.0))
                n_extra = int(not c.take_one_less_inference_step)
            else:
                s = m.solver_settings(tc.prox_max_iters, tol=tc.prox_tol)
                zw, st = m.solve(x[idx], z_prev, s, proximal=(tc.gamma, z_prev))
                n_extra = 0
            z[idx] = zw
            evals[idx] = st.nstep + n_extra
            residual[idx] = st.best_residual.to(residual.dtype)
            # reset rules: a solve that diverged or did not settle, or landmarks that jumped
            kp_new = m.read_out(zw).keypoints
            bad = st.diverged.to(images.device).clone()
            if tc.reset_residual is not None:
                bad |= st.best_residual > tc.reset_residual
            if tc.reset_displacement is not None:
                bad |= (kp_new - kp_old).norm(dim=-1).mean(dim=-1) > tc.reset_displacement
            cold[idx[bad]] = True
        # cold starts (first frames, resets, per-frame inference) solve from the model's default start: its
        # learned initial state when it has one (ldeq_fast/model/init_state.py), else zeros
        n_extra_cold = int(not c.take_one_less_inference_step)
        if bool(cold.all()):    # per-frame inference, or every stream starting: no gather / scatter
            z, st = m.solve(x, None, full)
            evals += st.nstep + n_extra_cold
            residual = st.best_residual.to(residual.dtype)
            diverged = st.diverged.to(images.device).clone()
        elif bool(cold.any()):
            idx = cold.nonzero().flatten()
            zc, st = m.solve(x[idx], None, full)
            z[idx] = zc
            evals[idx] += st.nstep + n_extra_cold
            residual[idx] = st.best_residual.to(residual.dtype)
            diverged[idx] = st.diverged.to(images.device)
        out = m.read_out(z)
        kpts, spread = out.keypoints, out.uncertainty
        frame_px = None
        if affines is not None:
            frame_px = apply_affine(kpts.double().cpu() * c.im_size, affines, inverse=True)
        dropped = diverged.tolist()
        for i, s in enumerate(streams):
            if dropped[i]:   # a diverged solve is never a warm start
                self.state.pop(s, None)
                continue
            prev_state = self.state.get(s)
            motion = None
            if (tc.motion != "none" and frame_px is not None and prev_state is not None
                    and prev_state.frame_kpts is not None and not bool(cold[i])):
                motion = fit_motion(prev_state.frame_kpts, frame_px[i], tc.motion)
            self.state[s] = _Stream(z[i].clone(), kpts[i].clone(), None if affines is None else affines[i].clone(),
                                    None if frame_px is None else frame_px[i], motion)
        started_cold = cold if tc.mode != "per_frame" else ~known
        return FrameResult(keypoints=kpts, uncertainty=spread, cell_evals=evals, reset=started_cold,
                           residual=residual, diverged=diverged)
