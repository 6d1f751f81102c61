"""Training augmentation for face crops and their landmarks.

Geometry (horizontal flip, rotation, scale, translation) is one affine and one warp of the image, so the
image is resampled once and the landmarks follow exactly.  Photometric changes (colour jitter, blur,
synthetic occlusion) touch only the image.  Every random draw comes from the numpy Generator passed in,
so a seed fixes the result.

Landmarks are in pixels of the image in the OpenCV convention (integer = pixel centre; see
``ldeq_fast.data.transforms``): the mirror of column x is ``W - 1 - x``.  Landmarks moved outside the
image are returned as they are; callers decide whether to clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ldeq_fast.data.layouts import layout_for
from ldeq_fast.data.transforms import apply_affine, warp


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_range(name: str, r: tuple, low: float = 0.0) -> None:
    if len(r) != 2 or not low <= r[0] <= r[1]:
        raise ValueError(f"{name} must be a (min, max) pair with {low} <= min <= max, got {r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation (defaults suit 256x256 face crops)."""

    flip_prob: float = 0.5
    rotate_prob: float = 0.5
    max_rotation_deg: float = 30.0
    scale_prob: float = 0.5
    scale_range: tuple = (0.9, 1.1)
    translate_prob: float = 0.5
    max_translate: float = 0.05          # fraction of the image width / height
    jitter_prob: float = 0.5
    brightness: float = 0.3              # factors drawn from [1 - x, 1 + x]
    contrast: float = 0.3
    saturation: float = 0.3
    blur_prob: float = 0.2
    motion_blur_share: float = 0.5       # of the blurs, how many are motion rather than gaussian
    gaussian_sigma: tuple = (0.5, 2.0)   # pixels
    motion_length: tuple = (3, 11)       # kernel length in pixels
    occlusion_prob: float = 0.3
    occlusion_size: tuple = (0.1, 0.4)   # rectangle side, fraction of the image side
    occlusion_noise_share: float = 0.5   # of the occluders, how many are noise rather than one colour

    def __post_init__(self):
        for name in ("flip_prob", "rotate_prob", "scale_prob", "translate_prob", "jitter_prob", "blur_prob",
                     "motion_blur_share", "occlusion_prob", "occlusion_noise_share"):
            _check_prob(name, getattr(self, name))
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg}")
        _check_range("scale_range", self.scale_range)
        if self.scale_range[0] <= 0:
            raise ValueError(f"scale_range must be positive, got {self.scale_range}")
        if not 0.0 <= self.max_translate < 1.0:
            raise ValueError(f"max_translate must be in [0, 1), got {self.max_translate}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check_range("gaussian_sigma", self.gaussian_sigma)
        _check_range("motion_length", self.motion_length, low=1)
        _check_range("occlusion_size", self.occlusion_size)
        if self.occlusion_size[1] > 1.0:
            raise ValueError(f"occlusion_size must be fractions <= 1, got {self.occlusion_size}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """A config that leaves every sample unchanged (turn single parts on with dataclasses.replace)."""
        return cls(flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, translate_prob=0.0, jitter_prob=0.0,
                   blur_prob=0.0, occlusion_prob=0.0)


def geometric_affine(rng: np.random.Generator, config: AugmentConfig, height: int, width: int
                     ) -> tuple[np.ndarray, bool]:
    """Draw the geometric part: (affine (2,3) mapping input to output pixels, whether it mirrors)."""
    c = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    flip = rng.random() < config.flip_prob
    angle = math.radians(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)) \
        if rng.random() < config.rotate_prob else 0.0
    scale = rng.uniform(*config.scale_range) if rng.random() < config.scale_prob else 1.0
    shift = rng.uniform(-config.max_translate, config.max_translate, size=2) * (width, height) \
        if rng.random() < config.translate_prob else np.zeros(2)
    mirror = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if flip else np.eye(3)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    # p -> s R (p - c) + c + shift
    rot = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    to_origin = np.array([[1.0, 0.0, -c[0]], [0.0, 1.0, -c[1]], [0.0, 0.0, 1.0]])
    back = np.array([[1.0, 0.0, c[0] + shift[0]], [0.0, 1.0, c[1] + shift[1]], [0.0, 0.0, 1.0]])
    return (back @ rot @ to_origin @ mirror)[:2].copy(), bool(flip)


def color_jitter(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Brightness, contrast and saturation factors from [1 - x, 1 + x], in that order, on RGB uint8."""
    img = image.astype(np.float32)
    b = rng.uniform(1 - config.brightness, 1 + config.brightness)
    c = rng.uniform(1 - config.contrast, 1 + config.contrast)
    s = rng.uniform(1 - config.saturation, 1 + config.saturation)
    img *= b
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # luma of RGB
    img = (img - gray.mean()) * c + gray.mean()
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = (img - gray[..., None]) * s + gray[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Gaussian blur, or a motion blur along a random direction."""
    if rng.random() < config.motion_blur_share:
        length = int(rng.integers(config.motion_length[0], config.motion_length[1] + 1))
        angle = rng.uniform(0.0, math.pi)
        kernel = np.zeros((length, length), np.float32)
        r, mid = (length - 1) / 2.0, (length - 1) / 2.0
        p0 = (round(mid - r * math.cos(angle)), round(mid - r * math.sin(angle)))
        p1 = (round(mid + r * math.cos(angle)), round(mid + r * math.sin(angle)))
        cv2.line(kernel, p0, p1, 1.0, thickness=1)
        kernel /= kernel.sum()
        return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)
    sigma = rng.uniform(*config.gaussian_sigma)
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)


def occlude(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Paint a random rectangle, inside the image, with one random colour or uniform noise."""
    H, W = image.shape[:2]
    h = max(1, int(round(rng.uniform(*config.occlusion_size) * H)))
    w = max(1, int(round(rng.uniform(*config.occlusion_size) * W)))
    y0 = int(rng.integers(0, H - h + 1))
    x0 = int(rng.integers(0, W - w + 1))
    out = image.copy()
    if rng.random() < config.occlusion_noise_share:
        out[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    else:
        out[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return out


def augment(image: np.ndarray, landmarks, rng: np.random.Generator, config: AugmentConfig | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Augment (image uint8 (H,W,3) RGB, landmarks (K,2) pixels) -> (image uint8 (H,W,3), landmarks
    float32 (K,2)).  A mirrored sample has its landmark indices remapped with the K-point layout's flip
    permutation, so index i keeps its semantic meaning (e.g. left eye corner)."""
    config = AugmentConfig() if config is None else config
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be a uint8 numpy array of shape (H, W, 3), got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"landmarks must have shape (K, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("landmarks contain NaN or inf")
    if config.flip_prob > 0:
        perm = layout_for(pts.shape[0]).flip_permutation()  # fails early for a layout without flip pairs
    H, W = image.shape[:2]

    A, flipped = geometric_affine(rng, config, H, W)
    if not np.allclose(A, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]):
        image = warp(image, A, (H, W))
        pts = apply_affine(pts, A)
        if flipped:
            pts = pts[perm]
    if rng.random() < config.jitter_prob:
        image = color_jitter(image, rng, config)
    if rng.random() < config.blur_prob:
        image = blur(image, rng, config)
    if rng.random() < config.occlusion_prob:
        image = occlude(image, rng, config)
    return image, pts.astype(np.float32)
