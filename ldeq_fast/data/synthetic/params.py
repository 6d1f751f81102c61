"""The parameters of one synthetic face (shape, expression, pose, appearance, scene, photometry) and their
checks.  Lengths are canonical face units: x to the image right, y down, face centre at the origin, half face
width ~0.9."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DIFFICULTIES = ("normal", "hard")
N_LANDMARKS = 98


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
