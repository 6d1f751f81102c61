"""Synthetic videos: a static camera, one moving face (two after a scene cut), smooth head motion and
expressions, blinks; 'hard' clips add episodes of sliding occluders, motion blur and low light."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

from ldeq_fast.data.synthetic.geometry import _OCCLUDER_DEPTH, _Y_CENTER, _geometry, _hw, _Projector
from ldeq_fast.data.synthetic.params import DIFFICULTIES, N_LANDMARKS
from ldeq_fast.data.synthetic.rendering import _background, _occluder_outline, _render
from ldeq_fast.data.synthetic.sampling import _sample_occluder, _uni, sample_params


@dataclass
class SyntheticVideo:
    """A synthetic clip from a static camera.  All arrays have the frame count T first."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    landmarks: np.ndarray  # (T, 98, 2) float32, frame pixels (ground truth, smooth)
    bboxes: np.ndarray  # (T, 4) float32 x1, y1, x2, y2: landmark extent expanded + per-frame jitter
    occluded: np.ndarray  # (T, 98) bool: landmark under an occluder
    motion_blur: np.ndarray  # (T,) bool
    low_light: np.ndarray  # (T,) bool
    shot: np.ndarray  # (T,) int: 0 before the scene cut, 1 from it on
    params: list  # T SyntheticFaceParams, to re-render or inspect a frame
    fps: float = 30.0


def _smooth_curve(rng, n, fps, fmin, fmax, k=3):
    """Sum of k sinusoids with random frequencies/phases, bounded by 1 in absolute value."""
    t = np.arange(n) / fps
    f = rng.uniform(fmin, fmax, k)
    ph = rng.uniform(0, 2 * np.pi, k)
    w = rng.dirichlet(np.ones(k))
    return (w[:, None] * np.sin(2 * np.pi * f[:, None] * t[None, :] + ph[:, None])).sum(0)


_BLINK = np.array([0.3, 0.7, 1.0, 0.8, 0.5, 0.25, 0.1])


def _blinks(rng, n, fps, rate_hz):
    closure = np.zeros(n)
    t = rng.exponential(1.0 / rate_hz) * fps
    while t < n:
        i = int(t)
        seg = _BLINK[: n - i]
        closure[i : i + len(seg)] = np.maximum(closure[i : i + len(seg)], seg)
        t += (rng.exponential(1.0 / rate_hz) + 0.5) * fps
    return closure


def _shot_params(rng, n, fps, difficulty, height, width, prev_centre=None):
    """Per-frame params of one shot: one identity and scene, smooth head motion and expressions, placed
    so every landmark stays inside the frame."""
    hard = difficulty == "hard"
    ident = sample_params(rng, difficulty)
    # one camera: steady exposure and focus; darkness and blur come only from the episodes
    ident = dataclasses.replace(ident, occluders=(), motion_blur_len=0.0, rotation=0.0, yaw=0.0, tx=0.0, ty=0.0,
                                brightness=_uni(rng, 0.85, 1.1), noise=min(ident.noise, 6.0 if hard else 3.0),
                                blur=min(ident.blur, 1.2))
    fmax = 0.8 if hard else 0.4

    def curve():
        return _smooth_curve(rng, n, fps, 0.05, fmax)

    rot = _uni(rng, -8, 8) + (25.0 if hard else 12.0) * curve()
    yaw = _uni(rng, -10, 10) + (40.0 if hard else 20.0) * curve()
    scale_var = 1.0 + (0.18 if hard else 0.1) * curve()
    mouth = np.clip(_uni(rng, -0.3, 0.2) + 0.5 * curve(), 0.0, 1.0)
    smile = np.clip(ident.smile + 0.4 * curve(), -0.3, 1.0)
    brow = np.clip(ident.brow_raise + 0.4 * curve(), -0.5, 1.0)
    gx, gy = 0.7 * curve(), 0.5 * curve()
    base_closure = _uni(rng, 0.0, 0.2)
    blink = _blinks(rng, n, fps, rate_hz=0.35)
    closure = np.clip(base_closure + blink, 0.0, 1.0)

    frames = [
        dataclasses.replace(ident, rotation=float(rot[t]), yaw=float(yaw[t]), mouth_open=float(mouth[t]),
                            smile=float(smile[t]), brow_raise=float(brow[t]), gaze_x=float(gx[t]),
                            gaze_y=float(gy[t]), eye_closure_left=float(closure[t]),
                            eye_closure_right=float(closure[t]))
        for t in range(n)
    ]
    # radius of the landmark set around the placement centre, in canonical units (rotation-invariant)
    radius = max(float(np.linalg.norm(_Projector(q, 64, 64).warp(g.landmarks, g.depth), axis=1).max())
                 for q in frames for g in (_geometry(q),))
    side = min(height, width)
    margin = 0.02 * side
    target = _uni(rng, 0.2, 0.28) * side  # landmark radius in pixels at the base scale
    scale0 = 2.0 * target / (radius * side)
    half = np.array([(width - 1) / 2.0, (height - 1) / 2.0]) - margin
    r_px = scale0 * scale_var.max() * side / 2.0 * radius
    if r_px > half.min():
        scale0 *= half.min() / r_px
        r_px = half.min()
    budget = half - r_px  # pixels the placement centre may move from the frame centre
    amp = budget * rng.uniform(0.4, 0.8 if hard else 0.7, 2)
    base = (budget - amp) * rng.uniform(-1, 1, 2)
    if prev_centre is not None:  # after a scene cut, start on the other side of the frame
        base = -np.sign(prev_centre + 1e-9) * (budget - amp) * rng.uniform(0.5, 1.0, 2)
    cx = base[0] + amp[0] * curve()
    cy = base[1] + amp[1] * curve()
    frames = [
        dataclasses.replace(q, scale=float(scale0 * scale_var[t]), tx=float(cx[t] / side), ty=float(cy[t] / side))
        for t, q in enumerate(frames)
    ]
    return frames, np.array([cx[-1], cy[-1]])


def _episodes(rng, n, side, frames):
    """'hard' videos: occluders sliding over the face, motion blur and low light over whole episodes."""
    kinds = [int(k) for k in rng.permutation(3)]
    n_ep = max(3, n // 45)
    occluders = [[] for _ in range(n)]
    for e in range(n_ep):
        kind = kinds[e % 3]
        length = int(rng.integers(min(n, max(2, n // 10)), min(n, max(3, n // 4)) + 1))
        start = int(rng.integers(0, n - length + 1))
        prof = np.sin(np.pi * (np.arange(length) + 0.5) / length)
        if kind == 0:
            oc = _sample_occluder(rng, hard=True)
            oc = dataclasses.replace(oc, rx=_uni(rng, 0.3, 0.55), ry=_uni(rng, 0.25, 0.5))
            phi = rng.uniform(0, 2 * np.pi)
            far = np.array([0.0, _Y_CENTER]) + 2.4 * np.array([math.cos(phi), math.sin(phi)])
            near = np.array([_uni(rng, -0.5, 0.5), _uni(rng, -0.3, 0.9)])
            for j in range(length):
                c = far + (near - far) * prof[j]
                occluders[start + j].append(dataclasses.replace(oc, cx=float(c[0]), cy=float(c[1])))
        elif kind == 1:
            peak, angle = _uni(rng, 8, 20) * side / 384.0, _uni(rng, 0, 180)
            for j in range(length):
                q = frames[start + j]
                frames[start + j] = dataclasses.replace(q, motion_blur_len=max(q.motion_blur_len, float(peak * prof[j])),
                                                        motion_blur_angle=angle)
        else:
            floor, extra_noise = _uni(rng, 0.15, 0.35), _uni(rng, 8, 16)
            for j in range(length):
                q = frames[start + j]
                frames[start + j] = dataclasses.replace(q, brightness=q.brightness * (1 - (1 - floor) * prof[j]),
                                                        noise=q.noise + extra_noise * prof[j])
    return [dataclasses.replace(q, occluders=tuple(o)) for q, o in zip(frames, occluders)]


def _inside(points, poly):
    return np.array([cv2.pointPolygonTest(poly.astype(np.float32), (float(x), float(y)), False) >= 0
                     for x, y in points])


def make_video(seed: int, n_frames: int, size: int = 256, difficulty: str = "normal",
               frame_hw: tuple | None = None, scene_cut: int | None = None, fps: float = 30.0,
               bbox_jitter: float = 0.03) -> SyntheticVideo:
    """A static-camera clip of one moving face (two after ``scene_cut``), deterministic in its arguments.

    size: the crop size the clip is meant for; the camera frame is round(1.5 * size) square unless
    ``frame_hw=(H, W)`` is given.  The landmark set spans roughly 30-50% of the frame's short side.
    Head motion (translation, rotation, scale, yaw) and expressions (mouth, smile, brows, gaze, blinks)
    are smooth sums of sinusoids; every landmark stays inside the frame.  'hard' adds episodes of sliding
    occluders, directional motion blur and low light (dark + noisy).  ``scene_cut=c`` switches identity,
    background and position at frame c.  Boxes are the landmark extent expanded (5% sides, 12% up, 4%
    down) with independent per-frame gaussian jitter of ``bbox_jitter`` x box size on centre and size.
    """
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(n_frames) != n_frames or n_frames < 1:
        raise ValueError(f"n_frames must be a positive integer, got {n_frames!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    if not bbox_jitter >= 0:
        raise ValueError(f"bbox_jitter must be >= 0, got {bbox_jitter!r}")
    n = int(n_frames)
    if scene_cut is not None and not (int(scene_cut) == scene_cut and 0 < scene_cut < n):
        raise ValueError(f"scene_cut must be a frame index in 1..{n - 1}, got {scene_cut!r}")
    h, w = _hw(frame_hw if frame_hw is not None else round(1.5 * _hw(size)[0]))
    side = min(h, w)

    bounds = [0, n] if scene_cut is None else [0, int(scene_cut), n]
    params, shot = [], np.zeros(n, np.int64)
    prev = None
    for k in range(len(bounds) - 1):
        rng = np.random.default_rng((int(seed), k))
        shot_frames, prev = _shot_params(rng, bounds[k + 1] - bounds[k], fps, difficulty, h, w, prev)
        params += shot_frames
        shot[bounds[k] : bounds[k + 1]] = k
    rng = np.random.default_rng((int(seed), 1000))
    params = [dataclasses.replace(q, noise_seed=int(s)) for q, s in zip(params, rng.integers(0, 2**62, n))]
    if difficulty == "hard":
        params = _episodes(rng, n, side, params)

    frames = np.empty((n, h, w, 3), np.uint8)
    landmarks = np.empty((n, N_LANDMARKS, 2), np.float32)
    occluded = np.zeros((n, N_LANDMARKS), bool)
    backgrounds = {}
    for t, q in enumerate(params):
        if shot[t] not in backgrounds:
            backgrounds[shot[t]] = _background(q, h, w)
        frames[t], landmarks[t] = _render(q, h, w, backgrounds[shot[t]])
        proj = _Projector(q, h, w)
        for oc in q.occluders:
            occluded[t] |= _inside(landmarks[t], proj(_occluder_outline(oc), _OCCLUDER_DEPTH))

    lo, hi = landmarks.min(1), landmarks.max(1)
    size_wh = hi - lo
    x1, x2 = lo[:, 0] - 0.05 * size_wh[:, 0], hi[:, 0] + 0.05 * size_wh[:, 0]
    y1, y2 = lo[:, 1] - 0.12 * size_wh[:, 1], hi[:, 1] + 0.04 * size_wh[:, 1]
    centre = np.stack([(x1 + x2) / 2, (y1 + y2) / 2], 1)
    box_wh = np.stack([x2 - x1, y2 - y1], 1)
    jit = rng.standard_normal((n, 4)) * bbox_jitter
    centre = centre + jit[:, :2] * box_wh
    box_wh = box_wh * np.exp(jit[:, 2:])
    bboxes = np.concatenate([centre - box_wh / 2, centre + box_wh / 2], 1).astype(np.float32)

    return SyntheticVideo(
        frames=frames,
        landmarks=landmarks,
        bboxes=bboxes,
        occluded=occluded,
        motion_blur=np.array([q.motion_blur_len >= 2.0 for q in params]),
        low_light=np.array([q.brightness < 0.6 for q in params]),
        shot=shot,
        params=params,
        fps=float(fps),
    )
