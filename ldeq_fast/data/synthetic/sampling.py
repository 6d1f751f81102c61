"""Drawing a face's parameters from a numpy Generator ('normal' and 'hard' difficulty), placed so that every
landmark lies inside the image."""

from __future__ import annotations

import dataclasses

import numpy as np

from ldeq_fast.data.synthetic.geometry import face_landmarks
from ldeq_fast.data.synthetic.params import DIFFICULTIES, Occluder, SyntheticFaceParams


def _uni(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _jitter_color(rng, base, amount):
    c = np.asarray(base, np.float64) + rng.uniform(-amount, amount, 3)
    return tuple(float(v) for v in np.clip(c, 0, 255))


_SKIN_ANCHORS = np.array(
    [(250, 222, 200), (236, 192, 160), (205, 152, 115), (165, 112, 80), (118, 80, 56), (78, 52, 38)], np.float64
)
_HAIR_COLORS = [(25, 22, 20), (55, 38, 28), (100, 68, 45), (185, 155, 105), (140, 70, 40), (165, 165, 165)]
_IRIS_COLORS = [(70, 45, 30), (100, 70, 45), (80, 115, 155), (85, 115, 80), (115, 120, 125)]


def _skin_tone(rng):
    t = rng.uniform(0, len(_SKIN_ANCHORS) - 1)
    i = min(int(t), len(_SKIN_ANCHORS) - 2)
    base = _SKIN_ANCHORS[i] + (t - i) * (_SKIN_ANCHORS[i + 1] - _SKIN_ANCHORS[i])
    return _jitter_color(rng, base, 8)


def _sample_occluder(rng, hard):
    shape = "rect" if rng.random() < 0.5 else "ellipse"
    big = 0.45 if hard else 0.28
    return Occluder(
        shape=shape,
        cx=_uni(rng, -0.6, 0.6),
        cy=_uni(rng, -0.3, 1.0),
        rx=_uni(rng, 0.12, big),
        ry=_uni(rng, 0.08, big),
        angle=_uni(rng, -90, 90),
        color=tuple(float(v) for v in rng.uniform(0, 255, 3)),
        texture=("flat", "stripes", "noise")[int(rng.integers(3))],
        seed=int(rng.integers(2**31)),
    )


def sample_params(rng: np.random.Generator, difficulty: str = "normal") -> SyntheticFaceParams:
    """Draw one face.  'normal': moderate pose and photometric variation, rare small occluders;
    'hard': large rotation/yaw, extreme expressions, heavy blur/noise, motion blur, low light, big
    occluders.  Scale and translation are adjusted so all landmarks lie inside the image (3% margin
    for 'normal', 1% for 'hard')."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(...)), got {type(rng).__name__}")
    hard = difficulty == "hard"
    face_width = _uni(rng, 0.82, 0.98)
    eye_y = _uni(rng, -0.25, -0.15)
    brow_gap = _uni(rng, 0.2, 0.28)
    brow_arch = _uni(rng, 0.04, 0.1)
    hairline = min(_uni(rng, -1.0, -0.72), eye_y - brow_gap - brow_arch - 0.2)

    closure = rng.uniform(0.0, 0.3) if rng.random() < 0.85 else rng.uniform(0.3, 1.0)
    wink = rng.uniform(-0.1, 0.1) if not (hard and rng.random() < 0.15) else rng.uniform(-1, 1)
    mouth_open = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, 1.0 if hard else 0.6)

    max_rot, max_yaw = (45.0, 50.0) if hard else (20.0, 25.0)
    n_occ = 0
    if hard and rng.random() < 0.6:
        n_occ = int(rng.integers(1, 3))
    elif not hard and rng.random() < 0.15:
        n_occ = 1
    low_light = hard and rng.random() < 0.15
    motion = hard and rng.random() < 0.2
    skin = _skin_tone(rng)
    hair = _jitter_color(rng, _HAIR_COLORS[int(rng.integers(len(_HAIR_COLORS)))], 10)

    p = SyntheticFaceParams(
        face_width=face_width,
        face_height=_uni(rng, 1.12, 1.35),
        forehead_height=_uni(rng, 1.1, 1.3),
        jaw_exponent=_uni(rng, 2.0, 3.0),
        jaw_taper=_uni(rng, 0.0, 0.3),
        temple_y=_uni(rng, -0.3, -0.12),
        eye_y=eye_y,
        eye_sep=_uni(rng, 0.36, 0.44),
        eye_width=_uni(rng, 0.15, 0.19),
        eye_height=_uni(rng, 0.45, 0.65),
        eye_tilt=_uni(rng, -0.015, 0.035),
        iris_radius=_uni(rng, 0.48, 0.58),
        pupil_radius=_uni(rng, 0.35, 0.5),
        brow_gap=brow_gap,
        brow_inner=_uni(rng, 0.08, 0.14),
        brow_outer=face_width * _uni(rng, 0.72, 0.82),
        brow_arch=brow_arch,
        brow_thickness=_uni(rng, 0.04, 0.07),
        nose_bottom=_uni(rng, 0.3, 0.42),
        nose_width=_uni(rng, 0.14, 0.2),
        mouth_pos=_uni(rng, 0.36, 0.46),
        mouth_width=_uni(rng, 0.25, 0.34),
        upper_lip=_uni(rng, 0.04, 0.07),
        lower_lip=_uni(rng, 0.05, 0.09),
        mouth_open=float(mouth_open),
        smile=_uni(rng, -0.3, 1.0) if hard else _uni(rng, -0.2, 0.8),
        brow_raise=_uni(rng, -0.5, 1.0) if hard else _uni(rng, -0.3, 0.6),
        eye_closure_left=float(np.clip(closure + wink, 0, 1)),
        eye_closure_right=float(np.clip(closure - wink, 0, 1)),
        gaze_x=_uni(rng, -1, 1),
        gaze_y=_uni(rng, -1, 1),
        rotation=_uni(rng, -max_rot, max_rot),
        yaw=_uni(rng, -max_yaw, max_yaw),
        scale=_uni(rng, 0.5, 0.9) if hard else _uni(rng, 0.6, 0.85),
        tx=_uni(rng, -0.1, 0.1) if hard else _uni(rng, -0.05, 0.05),
        ty=_uni(rng, -0.1, 0.1) if hard else _uni(rng, -0.05, 0.05),
        skin=skin,
        hair=hair,
        hair_style=int(rng.choice(3, p=[0.1, 0.55, 0.35])),
        hairline=hairline,
        iris=_jitter_color(rng, _IRIS_COLORS[int(rng.integers(len(_IRIS_COLORS)))], 12),
        lips=_jitter_color(rng, 0.5 * np.asarray(skin) + 0.5 * np.array([175, 70, 80]), 12),
        clothes=tuple(float(v) for v in rng.uniform(20, 235, 3)),
        background=tuple(float(v) for v in rng.uniform(0, 255, 3)),
        scene_seed=int(rng.integers(2**31)),
        clutter=int(rng.integers(10, 31) if hard else rng.integers(3, 13)),
        texture=_uni(rng, 0.05, 0.35) if hard else _uni(rng, 0.0, 0.2),
        occluders=tuple(_sample_occluder(rng, hard) for _ in range(n_occ)),
        brightness=_uni(rng, 0.25, 0.5) if low_light else _uni(rng, 0.8, 1.15),
        light_gx=_uni(rng, -0.6, 0.6) if hard else _uni(rng, -0.3, 0.3),
        light_gy=_uni(rng, -0.4, 0.4) if hard else _uni(rng, -0.2, 0.2),
        blur=_uni(rng, 0.0, 2.5) if hard else _uni(rng, 0.0, 1.0),
        motion_blur_len=_uni(rng, 4, 14) if motion else 0.0,
        motion_blur_angle=_uni(rng, 0, 180),
        noise=_uni(rng, 8, 20) if low_light else (_uni(rng, 0, 12) if hard else _uni(rng, 0, 5)),
        noise_seed=int(rng.integers(2**31)),
    )
    return _fit_in_image(p, margin=0.01 if hard else 0.03)


def _fit_in_image(p: SyntheticFaceParams, margin: float) -> SyntheticFaceParams:
    """Shrink, then shift the face so every landmark lies in [margin, 1 - margin] of a square image."""
    ref = 1000

    def extent(q):
        lm = face_landmarks(q, ref) / ref
        return lm.min(0), lm.max(0)

    lo, hi = extent(p)
    span, room = float((hi - lo).max()), 1.0 - 2.0 * margin
    if span > room:
        p = dataclasses.replace(p, scale=p.scale * room / span * 0.995)
        lo, hi = extent(p)
    shift = np.maximum(margin - lo, 0.0) - np.maximum(hi - (1.0 - margin), 0.0)
    return dataclasses.replace(p, tx=p.tx + float(shift[0]), ty=p.ty + float(shift[1]))
