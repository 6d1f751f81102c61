"""Face geometry in canonical units: the 98 WFLW landmarks and the outlines they sit on (jaw, brows, eyelids,
irises, nose, lips), and their projection to pixels (cylinder pseudo-yaw, then rotation, scale, shift).

"left" means image left (WFLW convention): contour point 0, brow 33-41, eye 60-67 and pupil 96 are on the
image left; the right-side features are the mirrored construction placed at the flip partners of
``WFLW98.flip_permutation()``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ldeq_fast.data.layouts import WFLW98
from ldeq_fast.data.synthetic.params import N_LANDMARKS, SyntheticFaceParams, _check_params

_FLIP = np.array(WFLW98.flip_permutation())
_Y_CENTER = 0.35  # canonical y placed at the placement centre (middle of the landmark extent)
_OCCLUDER_DEPTH = 0.6  # occluders float in front of the face (moves them under yaw like near objects)


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
