"""Drawing a face: background clutter, the projected face shapes (every drawn shape goes through the same
mapping as the landmarks), occluders, then lighting, blur, motion blur and sensor noise.  cv2 draws with
anti-aliasing at 1/16 px precision."""

from __future__ import annotations

import math

import cv2
import numpy as np

from ldeq_fast.data.synthetic.geometry import (
    _OCCLUDER_DEPTH,
    _Geometry,
    _geometry,
    _hw,
    _mouth_depth,
    _outline,
    _Projector,
)
from ldeq_fast.data.synthetic.params import Occluder, SyntheticFaceParams, _check_params

_SHIFT = 4  # fixed-point bits: cv2 draws with 1/16 px precision
_AA = cv2.LINE_AA


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



def render_face(params: SyntheticFaceParams, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Draw a face.  Returns (image uint8 (size, size, 3) RGB, landmarks float32 (98, 2) in pixels, pixel
    centres at integer coordinates).  ``size`` may also be (height, width).  Occluded landmarks keep their
    true positions."""
    _check_params(params)
    h, w = _hw(size)
    return _render(params, h, w)
