"""Procedurally drawn faces with 98 landmarks in the WFLW layout, as still images and as videos.

Every face is built in a canonical frame (x to the image right, y down, face centre at the origin, half
face width ~0.9), bent by a cylinder model for pseudo-yaw, then placed by a similarity transform
(rotation, scale, translation).  The drawn shapes go through the same mapping as the landmarks, so each
landmark sits on visible structure: jaw outline, brow polygons, eyelids, iris centres, nostril line, lips.

"left" means image left (WFLW convention): contour point 0, brow 33-41, eye 60-67 and pupil 96 are on the
image left.  The right-side features are the mirrored left-side construction placed at the flip partners
of ``WFLW98.flip_permutation()``.

Everything is deterministic: a face is a ``SyntheticFaceParams`` (which carries its own seeds for the
background clutter and the sensor noise), ``sample_params`` draws one from a numpy Generator, and
``SyntheticFaces`` seeds item i with ``np.random.default_rng((seed, i))``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from ldeq_fast.data.layouts import WFLW98
from ldeq_fast.data.transforms import normalize_image

__all__ = [
    "Occluder",
    "SyntheticFaceParams",
    "sample_params",
    "face_landmarks",
    "render_face",
    "SyntheticFaces",
    "SyntheticVideo",
    "make_video",
]

DIFFICULTIES = ("normal", "hard")
N_LANDMARKS = 98

_FLIP = np.array(WFLW98.flip_permutation())
_Y_CENTER = 0.35  # canonical y placed at the placement centre (middle of the landmark extent)
_SHIFT = 4  # fixed-point bits: cv2 draws with 1/16 px precision
_AA = cv2.LINE_AA
_OCCLUDER_DEPTH = 0.6  # occluders float in front of the face (moves them under yaw like near objects)


# --------------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class Occluder:
    """A shape over the face, in canonical face units (it moves with the face)."""

    shape: str = "ellipse"  # 'ellipse' | 'rect'
    cx: float = 0.0
    cy: float = 0.3
    rx: float = 0.3  # half sizes
    ry: float = 0.2
    angle: float = 0.0  # degrees, in the face frame
    color: tuple = (90, 90, 90)
    texture: str = "flat"  # 'flat' | 'stripes' | 'noise'
    seed: int = 0  # texture randomness


@dataclass(frozen=True)
class SyntheticFaceParams:
    """All per-face parameters.  Lengths are canonical face units unless noted; the defaults are a
    neutral frontal face."""

    # --- face shape
    face_width: float = 0.9  # half width at cheekbone level
    face_height: float = 1.25  # centre to chin
    forehead_height: float = 1.2  # centre to top of the head
    jaw_exponent: float = 2.4  # superellipse exponent of the jaw: 2 round, 3 square
    jaw_taper: float = 0.15  # narrowing of the jaw towards the chin
    temple_y: float = -0.22  # y of the contour ends, the widest line of the head
    eye_y: float = -0.2
    eye_sep: float = 0.4  # eye centre to midline
    eye_width: float = 0.17  # half width
    eye_height: float = 0.55  # upper-lid opening / eye_width
    eye_tilt: float = 0.015  # outer corner this much higher than the inner one
    iris_radius: float = 0.55  # / eye_width
    pupil_radius: float = 0.42  # / iris radius
    brow_gap: float = 0.24  # eye_y - brow base
    brow_inner: float = 0.1  # |x| of the inner brow end
    brow_outer: float = 0.68  # |x| of the outer brow end
    brow_arch: float = 0.07
    brow_thickness: float = 0.055
    nose_bottom: float = 0.36  # y of nostril-line centre (landmark 57)
    nose_width: float = 0.17  # |x| of the alar bases (55, 59)
    mouth_pos: float = 0.42  # mouth centre, fraction of the way from nose bottom to chin
    mouth_width: float = 0.3  # half width
    upper_lip: float = 0.055
    lower_lip: float = 0.07
    # --- expression
    mouth_open: float = 0.0  # 0..1
    smile: float = 0.2  # -0.3 (frown) .. 1
    brow_raise: float = 0.0  # -0.5 .. 1
    eye_closure_left: float = 0.0  # 0 open .. 1 closed
    eye_closure_right: float = 0.0
    gaze_x: float = 0.0  # -1..1, fraction of the possible iris travel
    gaze_y: float = 0.0
    # --- pose
    rotation: float = 0.0  # in-plane, degrees
    yaw: float = 0.0  # pseudo-yaw, degrees (positive: features shift to the image right)
    scale: float = 0.72  # canonical unit = scale * min(H, W) / 2 pixels
    tx: float = 0.0  # placement centre offset from the image centre, fraction of min(H, W)
    ty: float = 0.0
    # --- appearance
    skin: tuple = (215, 170, 135)  # RGB
    hair: tuple = (60, 40, 30)
    hair_style: int = 1  # 0 bald, 1 short, 2 long
    hairline: float = -0.85
    iris: tuple = (90, 60, 40)
    lips: tuple = (185, 105, 100)
    clothes: tuple = (70, 90, 140)
    background: tuple = (120, 130, 140)
    # --- scene
    scene_seed: int = 0  # background clutter and texture
    clutter: int = 8  # number of random background shapes
    texture: float = 0.15  # amplitude of the low-frequency background texture (fraction of 255)
    occluders: tuple = field(default_factory=tuple)  # of Occluder
    # --- photometric
    brightness: float = 1.0
    light_gx: float = 0.0  # illumination gradient across the image (fraction per half image)
    light_gy: float = 0.0
    blur: float = 0.5  # gaussian sigma, pixels
    motion_blur_len: float = 0.0  # pixels; < 2 means none
    motion_blur_angle: float = 0.0  # degrees
    noise: float = 2.0  # sensor noise std, 0..255 scale
    noise_seed: int = 0


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


# ------------------------------------------------------------------------------------------- geometry
def _superellipse(c, n):
    return np.sign(c) * np.abs(c) ** (2.0 / n)


def _outline(p, alpha):
    """Head outline at angles alpha (y down: sin > 0 is the jaw, sin < 0 the top of the head); widest at
    y = temple_y (alpha = 0, pi)."""
    c, s = np.cos(alpha), np.sin(alpha)
    jaw = s > 0
    n = np.where(jaw, p.jaw_exponent, 2.0)
    half_height = np.where(jaw, p.face_height - p.temple_y, p.forehead_height + p.temple_y)
    y = p.temple_y + half_height * _superellipse(s, n)
    taper = 1.0 - p.jaw_taper * np.clip(y / p.face_height, 0.0, None) ** 2
    x = p.face_width * _superellipse(c, n) * taper
    return np.stack([x, y], axis=1)


def _resample_by_arclength(curve, n):
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, curve[:, 0]), np.interp(t, s, curve[:, 1])], axis=1)


def _eye(p, side, closure):
    """One eye in left-eye landmark order: outer corner, 3 upper-lid points, inner corner, 3 lower-lid
    points (inner to outer).  side = -1 image left, +1 image right."""
    ew, cx = p.eye_width, side * p.eye_sep
    up0 = ew * p.eye_height
    lo0 = 0.6 * up0

    def lids(u):  # u: 0 outer corner .. 1 inner corner
        x = cx + side * ew * (1.0 - 2.0 * u)
        base = p.eye_y - p.eye_tilt * (1.0 - 2.0 * u)
        bump = np.sin(np.pi * u)
        lower = base + lo0 * (1.0 - 0.5 * closure) * bump
        upper = (1.0 - closure) * (base - up0 * bump) + closure * lower
        return x, upper, lower

    ul = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    ll = np.array([0.75, 0.5, 0.25])
    xu, yu, _ = lids(ul)
    xl, _, yl = lids(ll)
    landmarks = np.concatenate([np.stack([xu, yu], 1), np.stack([xl, yl], 1)])

    ud = np.linspace(0.0, 1.0, 17)
    xd, yud, yld = lids(ud)
    upper = np.stack([xd, yud], 1)
    lower = np.stack([xd, yld], 1)
    sclera = np.concatenate([upper, lower[::-1][1:-1]])

    iris_x = cx + p.gaze_x * 0.35 * ew
    u_iris = np.clip((1.0 - side * (iris_x - cx) / ew) / 2.0, 0.0, 1.0)
    _, top, bottom = lids(u_iris)
    iris_y = float(np.clip(p.eye_y + 0.1 * lo0 + p.gaze_y * 0.25 * up0, top, bottom))
    return landmarks, np.array([iris_x, iris_y]), upper, lower, sclera


def _brow(p, side):
    """One brow in left-brow landmark order: 5 upper points outer to inner, 4 lower points inner to outer."""
    base = p.eye_y - p.brow_gap - 0.07 * p.brow_raise
    arch = p.brow_arch + 0.02 * p.brow_raise

    def curves(u):  # u: 0 outer end .. 1 inner end
        x = side * (p.brow_outer + (p.brow_inner - p.brow_outer) * u)
        upper = base - arch * np.sin(np.pi * u**0.75) + 0.03 * (1.0 - u) ** 2
        lower = upper + p.brow_thickness * (0.55 + 0.6 * u)
        return x, upper, lower

    xu, yu, _ = curves(np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
    xl, _, yl = curves(np.array([0.875, 0.625, 0.375, 0.125]))
    landmarks = np.concatenate([np.stack([xu, yu], 1), np.stack([xl, yl], 1)])
    ud = np.linspace(0.0, 1.0, 13)
    xd, yud, yld = curves(ud)
    polygon = np.concatenate([np.stack([xd, yud], 1), np.stack([xd, yld], 1)[::-1]])
    return landmarks, polygon


def _mouth(p):
    """Outer ring (12 points from the left corner, upper lip first) and inner ring (8 points), dense
    outlines, and depth per point."""
    mw = p.mouth_width * (1.0 + 0.12 * p.smile) * (1.0 - 0.1 * p.mouth_open)
    ym = p.nose_bottom + p.mouth_pos * (p.face_height - p.nose_bottom)
    gap = 0.2 * p.mouth_open
    inner_w = 0.88

    def mid(u):  # closed-lip line; a smile lifts the corners
        return ym - p.smile * 0.07 * (2.0 * u - 1.0) ** 2

    def outer(u):
        b = np.sin(np.pi * u)
        bow = 1.0 - 0.3 * np.exp(-(((u - 0.5) / 0.08) ** 2))  # cupid's bow dip
        x = -mw + 2.0 * mw * u
        up = mid(u) - 0.5 * gap * b - p.upper_lip * b**0.6 * bow
        lo = mid(u) + 0.5 * gap * b + p.lower_lip * b**0.7
        return x, up, lo

    def inner(u):
        b = np.sin(np.pi * u)
        x = inner_w * (-mw + 2.0 * mw * u)
        uo = 0.5 + inner_w * (u - 0.5)  # same x on the outer parameterisation
        return x, mid(uo) - 0.5 * gap * b, mid(uo) + 0.5 * gap * b

    uo = np.array([0.0, 1, 2, 3, 4, 5, 6]) / 6.0
    xo, yuo, _ = outer(uo)
    xl, _, ylo = outer(uo[1:-1][::-1])
    outer_lm = np.concatenate([np.stack([xo, yuo], 1), np.stack([xl, ylo], 1)])
    ui = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    xi, yui, _ = inner(ui)
    xil, _, yli = inner(ui[1:-1][::-1])
    inner_lm = np.concatenate([np.stack([xi, yui], 1), np.stack([xil, yli], 1)])

    ud = np.linspace(0.0, 1.0, 25)
    xd, yud, yld = outer(ud)
    outer_poly = np.concatenate([np.stack([xd, yud], 1), np.stack([xd, yld], 1)[::-1][1:-1]])
    xid, yuid, ylid = inner(ud)
    inner_upper = np.stack([xid, yuid], 1)
    inner_poly = np.concatenate([inner_upper, np.stack([xid, ylid], 1)[::-1][1:-1]])
    return outer_lm, inner_lm, outer_poly, inner_poly, inner_upper, gap


@dataclass
class _Geometry:
    landmarks: np.ndarray  # (98, 2) canonical
    depth: np.ndarray  # (98,)
    outline: np.ndarray  # dense jaw contour (left temple -> chin -> right temple)
    head: np.ndarray  # closed skin polygon
    eyes: list  # per side: (iris centre, upper lid, lower lid, sclera polygon)
    brows: list  # polygons
    mouth_outer: np.ndarray
    mouth_inner: np.ndarray
    mouth_inner_upper: np.ndarray
    mouth_gap: float


def _geometry(p: SyntheticFaceParams) -> _Geometry:
    lm = np.zeros((N_LANDMARKS, 2))
    depth = np.zeros(N_LANDMARKS)

    outline = _outline(p, np.linspace(np.pi, 0.0, 241))
    lm[0:33] = _resample_by_arclength(outline, 33)
    top = _outline(p, np.linspace(0.0, -np.pi, 61)[1:-1])
    head = np.concatenate([outline, top])

    brows, eyes = [], []
    left_brow, right_brow = slice(33, 42), _FLIP[33:42]
    left_eye, right_eye = slice(60, 68), _FLIP[60:68]
    for side, brow_idx, eye_idx, pupil_idx, closure in (
        (-1, left_brow, left_eye, 96, p.eye_closure_left),
        (1, right_brow, right_eye, 97, p.eye_closure_right),
    ):
        brow_lm, brow_poly = _brow(p, side)
        lm[brow_idx] = brow_lm
        depth[brow_idx] = 0.05
        brows.append(brow_poly)
        eye_lm, iris_c, upper, lower, sclera = _eye(p, side, closure)
        lm[eye_idx] = eye_lm
        lm[pupil_idx] = iris_c
        eyes.append((iris_c, upper, lower, sclera))

    tip_y = p.nose_bottom - 0.07
    lm[51:55, 0] = 0.0
    lm[51:55, 1] = np.linspace(p.eye_y + 0.03, tip_y, 4)
    depth[51:55] = (0.08, 0.18, 0.3, 0.42)
    nw = p.nose_width
    lm[55:60, 0] = (-nw, -0.5 * nw, 0.0, 0.5 * nw, nw)
    lm[55:60, 1] = p.nose_bottom - np.array([0.045, 0.012, 0.0, 0.012, 0.045])
    depth[55:60] = (0.12, 0.22, 0.3, 0.22, 0.12)

    outer_lm, inner_lm, outer_poly, inner_poly, inner_upper, gap = _mouth(p)
    lm[76:88] = outer_lm
    lm[88:96] = inner_lm
    depth[76:96] = _mouth_depth(p, lm[76:96])
    return _Geometry(lm, depth, outline, head, eyes, brows, outer_poly, inner_poly, inner_upper, gap)


def _mouth_depth(p, pts):
    return 0.08 + 0.06 * np.sin(np.pi * (pts[:, 0] / (2 * p.mouth_width) + 0.5).clip(0, 1))


class _Projector:
    """Canonical face coordinates -> image pixels: cylinder pseudo-yaw, then rotation, scale, shift."""

    def __init__(self, p: SyntheticFaceParams, height: int, width: int):
        side = min(height, width)
        self.px = p.scale * side / 2.0  # pixels per canonical unit
        self.centre = np.array([(width - 1) / 2.0 + p.tx * side, (height - 1) / 2.0 + p.ty * side])
        th = math.radians(p.rotation)
        self.rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        self.psi = math.radians(p.yaw)
        self.radius = p.face_width

    def warp(self, pts, depth=0.0):
        """Pseudo-yaw on a vertical cylinder of the face's half width: the far side compresses, points
        with depth (nose, lips) shift further; result is centred on the placement centre."""
        u = pts[:, 0] / self.radius
        uc = np.clip(u, -1.0, 1.0)
        ang = np.clip(np.arcsin(uc) + self.psi, -np.pi / 2, np.pi / 2)
        x = self.radius * (np.sin(ang) + (u - uc)) + np.asarray(depth) * self.radius * math.sin(self.psi)
        return np.stack([x, pts[:, 1] - _Y_CENTER], axis=1)

    def __call__(self, pts, depth=0.0):
        return self.centre + self.px * (self.warp(np.asarray(pts, np.float64), depth) @ self.rot.T)


def face_landmarks(params: SyntheticFaceParams, size: int | tuple = 256) -> np.ndarray:
    """Landmarks (98, 2) float32 in pixels of a size x size image (or (height, width)), without drawing."""
    _check_params(params)
    h, w = _hw(size)
    g = _geometry(params)
    return _Projector(params, h, w)(g.landmarks, g.depth).astype(np.float32)


def _hw(size):
    h, w = (size, size) if np.isscalar(size) else size
    if int(h) != h or int(w) != w or h < 16 or w < 16:
        raise ValueError(f"image size must be integers >= 16, got {size!r}")
    return int(h), int(w)


# -------------------------------------------------------------------------------------------- drawing
def _fx(pts):
    return np.round(np.asarray(pts) * (1 << _SHIFT)).astype(np.int32)


def _fill(img, pts, color):
    cv2.fillPoly(img, [_fx(pts)], color, _AA, _SHIFT)


def _line(img, pts, color, thickness, closed=False):
    cv2.polylines(img, [_fx(pts)], closed, color, thickness, _AA, _SHIFT)


def _ellipse_pts(cx, cy, rx, ry, angle_deg=0.0, n=24):
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    a = math.radians(angle_deg)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack([cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)], 1)


def _rect_pts(cx, cy, rx, ry, angle_deg=0.0):
    a = math.radians(angle_deg)
    corners = np.array([[-rx, -ry], [rx, -ry], [rx, ry], [-rx, ry]])
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return corners @ r.T + (cx, cy)


def _shade(color, f):
    return tuple(float(min(255.0, c * f)) for c in color)


def _mix(a, b, t):
    return tuple(float((1 - t) * x + t * y) for x, y in zip(a, b))


def _composite(img, mask_poly, paint):
    """Paint on a copy of the region around mask_poly (pixels) and keep it only inside the polygon."""
    h, w = img.shape[:2]
    x0, y0 = np.floor(mask_poly.min(0)).astype(int) - 1
    x1, y1 = np.ceil(mask_poly.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    layer = roi.copy()
    offset = np.array([x0, y0], np.float64)
    paint(layer, offset)
    mask = np.zeros(roi.shape[:2], np.uint8)
    _fill(mask, mask_poly - offset, 255)
    m = mask[..., None].astype(np.float32) * (1.0 / 255.0)
    roi[:] = (roi * (1.0 - m) + layer * m + 0.5).astype(np.uint8)


def _background(p: SyntheticFaceParams, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(p.scene_seed)
    cells = rng.integers(3, 9, 2)
    tex = (rng.random((cells[0], cells[1], 3)) - 0.5) * (255.0 * 2 * p.texture) + np.asarray(p.background)
    img = cv2.resize(np.clip(tex, 0, 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)
    side = min(height, width)
    for _ in range(p.clutter):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        r = rng.uniform(0.03, 0.25) * side
        kind = int(rng.integers(4))
        if kind == 0:
            _fill(img, _rect_pts(cx, cy, r, r * rng.uniform(0.2, 1.0), rng.uniform(0, 180)), color)
        elif kind == 1:
            _fill(img, _ellipse_pts(cx, cy, r, r * rng.uniform(0.3, 1.0), rng.uniform(0, 180)), color)
        elif kind == 2:
            pts = np.array([[cx, cy]]) + rng.uniform(-r, r, (2, 2))
            _line(img, pts, color, int(rng.integers(1, max(2, side // 40))))
        else:
            _fill(img, np.array([[cx, cy]]) + rng.uniform(-r, r, (3, 2)), color)
    return img


class _Scene:
    """Canonical shapes and the draw commands that use them, projected to pixels in one call."""

    def __init__(self):
        self._pts, self._depth, self._n = [], [], 0
        self.ops = []  # (kind, slices, colour, thickness, extra)

    def add(self, pts, depth=0.0) -> slice:
        pts = np.asarray(pts, np.float64)
        self._pts.append(pts)
        self._depth.append(np.broadcast_to(np.asarray(depth, np.float64), (len(pts),)))
        self._n += len(pts)
        return slice(self._n - len(pts), self._n)

    def fill(self, pts, colour, depth=0.0):
        self.ops.append(("fill", self.add(pts, depth), colour, 0, None))

    def line(self, pts, colour, thickness, depth=0.0, closed=False):
        self.ops.append(("line", self.add(pts, depth), colour, thickness, closed))

    def project(self, proj: _Projector) -> np.ndarray:
        return proj(np.concatenate(self._pts), np.concatenate(self._depth))


def _face_scene(scene: _Scene, p: SyntheticFaceParams, g: _Geometry, px_per_unit: float):
    skin = p.skin

    def thick(units):
        return max(1, int(round(px_per_unit * units)))

    lw = thick(0.012)

    # hair behind the head, neck and shoulders
    if p.hair_style > 0:
        bottom = 0.25 if p.hair_style == 1 else p.face_height * 0.95
        t = np.linspace(np.pi, 2 * np.pi, 25)
        arc = np.stack([1.12 * p.face_width * np.cos(t), -0.2 + (p.forehead_height + 0.12) * np.sin(t)], 1)
        wide = 1.12 if p.hair_style == 1 else 1.25
        back = np.concatenate([arc, [[wide * p.face_width, bottom], [-wide * p.face_width, bottom]]])
        scene.fill(back, p.hair, -0.2)
    nw = 0.55 * p.face_width
    neck = [[-nw, 0.3 * p.face_height], [nw, 0.3 * p.face_height],
            [1.1 * nw, p.face_height + 2.5], [-1.1 * nw, p.face_height + 2.5]]
    scene.fill(neck, _shade(skin, 0.72), -0.3)
    ys = p.face_height + 0.45
    scene.fill([[-nw, ys], [nw, ys], [2.4, ys + 0.45], [2.4, ys + 3.0], [-2.4, ys + 3.0], [-2.4, ys + 0.45]],
               p.clothes, -0.3)

    # skin, jaw shadow, fringe
    scene.fill(g.head, skin)
    scene.line(g.outline, _shade(skin, 0.72), lw)
    if p.hair_style > 0:
        top = _outline(p, np.linspace(-0.05, -np.pi + 0.05, 41))
        hairline = p.hairline + 0.2 * (top[:, 0] / p.face_width) ** 2
        low = np.stack([top[:, 0], np.maximum(top[:, 1], hairline)], 1)[::-1]
        scene.fill(np.concatenate([top, low]), p.hair)

    # eyes: socket shading, sclera, iris clipped to the lids, lids
    for (iris_c, upper, lower, sclera), closure in zip(g.eyes, (p.eye_closure_left, p.eye_closure_right)):
        cx = float(np.mean(sclera[:, 0]))
        scene.fill(_ellipse_pts(cx, p.eye_y - 0.01, 1.3 * p.eye_width, 0.16), _shade(skin, 0.9))
        sclera_s = scene.add(sclera)
        scene.ops.append(("fill", sclera_s, (236, 232, 226), 0, None))
        if closure < 0.98:
            r = p.iris_radius * p.eye_width
            iris = scene.add(_ellipse_pts(iris_c[0], iris_c[1], r, r))
            pupil = scene.add(_ellipse_pts(iris_c[0], iris_c[1], r * p.pupil_radius, r * p.pupil_radius))
            glint = scene.add(_ellipse_pts(iris_c[0] + 0.3 * r, iris_c[1] - 0.3 * r, 0.15 * r, 0.15 * r, n=8))
            inner = [("fill", iris, p.iris, 0, None), ("line", iris, _shade(p.iris, 0.55), lw, True),
                     ("fill", pupil, (12, 10, 10), 0, None), ("fill", glint, (250, 250, 250), 0, None)]
            scene.ops.append(("clip", sclera_s, None, 0, inner))
        scene.line(upper, (30, 22, 20), thick(0.022))
        scene.line(lower, _shade(skin, 0.6), lw)

    brow_colour = _shade(_mix(p.hair, skin, 0.2), 0.75)
    for poly in g.brows:
        scene.fill(poly, brow_colour, 0.05)

    # nose: bridge shadows, tip highlight, alar wings, nostrils, base line
    lm, nb, nwd = g.landmarks, p.nose_bottom, p.nose_width
    tip_y = lm[54, 1]
    dark = _shade(skin, 0.7)
    for s in (-1, 1):
        scene.line([[s * 0.06, lm[51, 1] + 0.06], [s * 0.07, tip_y - 0.03]], _shade(skin, 0.82), lw, 0.2)
        wing = [[s * 0.75 * nwd, tip_y - 0.05], [s * 1.05 * nwd, nb - 0.09], [s * 1.05 * nwd, nb - 0.06],
                [s * nwd, nb - 0.045]]
        scene.line(wing, dark, lw, 0.12)
        scene.fill(_ellipse_pts(s * 0.5 * nwd, nb - 0.028, 0.045, 0.02, s * 15, n=16), _shade(skin, 0.35), 0.2)
    scene.fill(_ellipse_pts(0.0, tip_y, 0.06, 0.04, n=16), _shade(skin, 1.1), 0.42)
    scene.line(lm[55:60], dark, lw, g.depth[55:60])

    # mouth: lips, interior and teeth when open, lip line
    scene.fill(g.mouth_outer, p.lips, _mouth_depth(p, g.mouth_outer))
    if g.mouth_gap > 0.01:
        scene.fill(g.mouth_inner, (55, 18, 22), _mouth_depth(p, g.mouth_inner))
        if g.mouth_gap > 0.04:
            teeth = np.concatenate([g.mouth_inner_upper, (g.mouth_inner_upper + (0, 0.35 * g.mouth_gap))[::-1]])
            scene.fill(teeth, (232, 228, 215), _mouth_depth(p, teeth))
    scene.line(g.mouth_inner_upper, _shade(p.lips, 0.45), lw, _mouth_depth(p, g.mouth_inner_upper))


def _occluder_outline(oc: Occluder):
    make = _rect_pts if oc.shape == "rect" else _ellipse_pts
    return make(oc.cx, oc.cy, oc.rx, oc.ry, oc.angle)


def _occluder_scene(scene: _Scene, occluders):
    for oc in occluders:
        outline = scene.add(_occluder_outline(oc), _OCCLUDER_DEPTH)
        if oc.texture == "flat":
            scene.ops.append(("fill", outline, oc.color, 0, None))
        else:
            scene.ops.append(("texture", outline, oc.color, 0, oc))


def _paint_texture(layer, oc: Occluder):
    rng = np.random.default_rng(oc.seed)
    layer[:] = oc.color
    h, w = layer.shape[:2]
    if oc.texture == "stripes":
        step = int(rng.integers(4, 12))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        for k in range(-h, w, step * 2):
            cv2.line(layer, (k, 0), (k + h, h), colour, step, _AA)
    else:
        noise = rng.normal(0.0, 40.0, (h, w, 1)).astype(np.float32)
        layer[:] = np.clip(layer.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _execute(img, ops, px, offset=None):
    for kind, sl, colour, thickness, extra in ops:
        pts = px[sl] if offset is None else px[sl] - offset
        if kind == "fill":
            _fill(img, pts, colour)
        elif kind == "line":
            _line(img, pts, colour, thickness, closed=extra)
        elif kind == "clip":  # draw `extra` ops only inside the polygon

            def paint(layer, off, inner=extra):
                _execute(layer, inner, px, off if offset is None else off + offset)

            _composite(img, pts, paint)
        else:  # textured occluder

            def paint(layer, off, oc=extra):
                _paint_texture(layer, oc)

            _composite(img, pts, paint)


def _motion_kernel(length, angle_deg):
    k = int(math.ceil(length)) | 1
    kernel = np.zeros((k, k), np.float32)
    c = (k - 1) / 2.0
    dx, dy = 0.5 * length * math.cos(math.radians(angle_deg)), 0.5 * length * math.sin(math.radians(angle_deg))
    cv2.line(kernel, _fx([c - dx, c - dy]), _fx([c + dx, c + dy]), 1.0, 1, _AA, _SHIFT)
    return kernel / kernel.sum()


_NOISE_TILE = 768
_noise_tile = None


def _noise_field(rng, h, w):
    """Unit gaussian noise (h, w, 3): a random window of one cached tile in one of 8 orientations
    (drawing fresh gaussians costs more than the rest of a render)."""
    global _noise_tile
    if h > _NOISE_TILE or w > _NOISE_TILE:
        return rng.standard_normal((h, w, 3), dtype=np.float32)
    if _noise_tile is None:
        _noise_tile = np.random.default_rng(20230613).standard_normal((_NOISE_TILE, _NOISE_TILE, 3), np.float32)
    tile = _noise_tile
    k = int(rng.integers(8))
    if k & 4:
        tile = tile.transpose(1, 0, 2)
    tile = tile[:: 1 - 2 * (k & 1), :: 1 - (k & 2)]
    y, x = int(rng.integers(_NOISE_TILE - h + 1)), int(rng.integers(_NOISE_TILE - w + 1))
    return tile[y : y + h, x : x + w]


def _photometric(img: np.ndarray, p: SyntheticFaceParams) -> np.ndarray:
    h, w = img.shape[:2]
    gx = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    gy = np.linspace(-1.0, 1.0, h, dtype=np.float32)
    light = p.brightness * np.clip(1.0 + p.light_gx * gx[None, :] + p.light_gy * gy[:, None], 0.05, None)
    f = np.multiply(img, light[..., None], dtype=np.float32)
    if p.blur > 0.3:
        f = cv2.GaussianBlur(f, (0, 0), p.blur)
    if p.motion_blur_len >= 2.0:
        f = cv2.filter2D(f, -1, _motion_kernel(p.motion_blur_len, p.motion_blur_angle))
    if p.noise > 0:
        f += _noise_field(np.random.default_rng(p.noise_seed), h, w) * np.float32(p.noise)
    np.maximum(f, 0.0, out=f)
    return cv2.convertScaleAbs(f)  # rounds and saturates at 255


def _render(p: SyntheticFaceParams, height: int, width: int, background: np.ndarray | None = None):
    g = _geometry(p)
    proj = _Projector(p, height, width)
    scene = _Scene()
    _face_scene(scene, p, g, proj.px)
    _occluder_scene(scene, p.occluders)
    landmarks = scene.add(g.landmarks, g.depth)
    px = scene.project(proj)
    img = _background(p, height, width) if background is None else background.copy()
    _execute(img, scene.ops, px)
    return _photometric(img, p), px[landmarks].astype(np.float32)


def _check_params(p: SyntheticFaceParams):
    if not isinstance(p, SyntheticFaceParams):
        raise TypeError(f"params must be SyntheticFaceParams, got {type(p).__name__}")
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        values = v if isinstance(v, tuple) and f.name != "occluders" else (v,)
        if any(isinstance(x, (float, int)) and not math.isfinite(x) for x in values):
            raise ValueError(f"SyntheticFaceParams.{f.name} must be finite, got {v!r}")
    if not (p.scale > 0 and p.face_width > 0 and p.eye_width > 0 and p.mouth_width > 0):
        raise ValueError(f"scale, face_width, eye_width and mouth_width must be positive, got "
                         f"{p.scale}, {p.face_width}, {p.eye_width}, {p.mouth_width}")


def render_face(params: SyntheticFaceParams, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Draw a face.  Returns (image uint8 (size, size, 3) RGB, landmarks float32 (98, 2) in pixels, pixel
    centres at integer coordinates).  ``size`` may also be (height, width).  Occluded landmarks keep their
    true positions."""
    _check_params(params)
    h, w = _hw(size)
    return _render(params, h, w)


# -------------------------------------------------------------------------------------------- dataset

class SyntheticFaces(torch.utils.data.Dataset):
    """n procedurally drawn faces; item i depends only on (seed, i, size, difficulty).

    Items: {'image': float32 (3, size, size) ImageNet-normalised, 'kpts': float32 (98, 2) = pixels / size,
    'index': i}.
    """

    def __init__(self, n: int, size: int = 256, seed: int = 0, difficulty: str = "normal"):
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        if not np.isscalar(size):
            raise ValueError(f"size must be one integer (square images), got {size!r}")
        self.n, self.size, self.seed, self.difficulty = int(n), _hw(size)[0], int(seed), difficulty

    def __len__(self):
        return self.n

    def params(self, i: int) -> SyntheticFaceParams:
        return sample_params(np.random.default_rng((self.seed, i)), self.difficulty)

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} synthetic faces")
        i = int(i) % self.n
        img, lm = render_face(self.params(i), self.size)
        return {"image": normalize_image(img), "kpts": torch.from_numpy(lm / np.float32(self.size)), "index": i}


# --------------------------------------------------------------------------------------------- videos
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
