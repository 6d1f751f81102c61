"""Photos in, face crops out: reading image files, converting arrays of any common layout to RGB uint8,
and cropping a face box with the published crop rule (:func:`ldeq_fast.data.transforms.affine_from_bbox`).

Problems with one image are :class:`ImageError` (a ValueError) with a message naming the image, so a batch
can report that image and go on with the others.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from ldeq_fast.data.transforms import affine_from_bbox, warp

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2")


class ImageError(ValueError):
    """An image that cannot be used; the message names it and the problem."""


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """(H, W) / (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA arrays of dtype uint8, uint16 (scaled by
    255/65535) or float in [0, 1] -> (H, W, 3) uint8 RGB.  RGBA is composited over black (transparent
    pixels' colours are undefined in many files)."""
    try:
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array (H, W[, C]), got {type(image).__name__}")
    a = image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{name}: empty image of shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = ((a.astype(np.float32) * (255.0 / 65535.0)) + 0.5).astype(np.uint8)
    elif a.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: float image contains NaN or inf")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"{name}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                             "(pass uint8 for 0..255 data)")
        a = (a.astype(np.float32) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    if a.ndim == 2:
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.uint16)
        return ((a[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def read_image(path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grey, RGBA and 16-bit files converted as :func:`as_rgb_uint8`)."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a directory, not an image")
    data = np.fromfile(p, dtype=np.uint8)   # (cv2.imread cannot say why it failed)
    if data.size == 0:
        raise ImageError(f"{p}: empty file")
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        if "MAX_IMAGE_PIXELS" in str(exc):
            raise ImageError(f"{p}: too large for OpenCV to decode (over its OPENCV_IO_MAX_IMAGE_PIXELS limit, 2^30 "
                             "pixels by default; raise it in the environment if you have the memory)") from exc
        raise ImageError(f"{p}: OpenCV cannot decode it: {exc}") from exc
    if bgr is None:
        raise ImageError(f"{p}: not a readable image (corrupt, not an image, an unsupported format, or over "
                         "OpenCV's OPENCV_IO_MAX_IMAGE_PIXELS limit, 2^30 pixels by default)")
    if bgr.ndim == 3 and bgr.shape[2] == 3:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    elif bgr.ndim == 3 and bgr.shape[2] == 4:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGBA)
    return as_rgb_uint8(bgr, str(p))


def list_images(inputs) -> list[Path]:
    """Files given directly (any name) and the image files (by suffix) directly inside given folders, in
    order; a missing path raises FileNotFoundError."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def check_box(box, shape, name: str = "box") -> np.ndarray:
    """A box (x1, y1, x2, y2) as float64, checked: finite, x2 > x1, y2 > y1, and overlapping the image of
    ``shape`` (H, W, ...) -- a box outside the image is a wrong box, not an empty face."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape[0] < 4:
        raise ImageError(f"{name} must be (x1, y1, x2, y2), got {b.tolist()}")
    b = b[:4]
    if not np.isfinite(b).all():
        raise ImageError(f"{name} contains NaN or inf: {b.tolist()}")
    if not (b[2] > b[0] and b[3] > b[1]):
        raise ImageError(f"{name} {b.tolist()} must have x2 > x1 and y2 > y1")
    H, W = shape[:2]
    if b[2] <= 0 or b[3] <= 0 or b[0] >= W or b[1] >= H:
        raise ImageError(f"{name} {[round(v, 1) for v in b.tolist()]} lies outside the {W}x{H} image")
    return b


def crop_face(image: np.ndarray, box, size: int, extra_scale: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """The model's input crop of ``box`` (x1, y1, x2, y2): the square of side ``extra_scale`` x the longer box
    side around the box centre (:func:`affine_from_bbox`, the published rule), resampled to ``size``.

    Returns (crop (size, size, 3) uint8, affine (2, 3) image -> crop pixels).  Only the region under the
    crop is resampled, so the image may be of any size; a crop that shrinks the face by more than 2x is
    taken from a Gaussian pyramid level (plain bilinear sampling would alias).
    """
    A = affine_from_bbox(box, extra_scale, size)
    H, W = image.shape[:2]
    inv_scale = 1.0 / A[0, 0]                      # image pixels per crop pixel (no rotation in the rule)
    # the crop's footprint in the image, one pixel of margin for the bilinear taps
    x0 = (0 - A[0, 2]) * inv_scale
    y0 = (0 - A[1, 2]) * inv_scale
    side = size * inv_scale
    ix0, iy0 = max(0, math.floor(x0) - 2), max(0, math.floor(y0) - 2)
    ix1, iy1 = min(W, math.ceil(x0 + side) + 3), min(H, math.ceil(y0 + side) + 3)
    if ix1 <= ix0 or iy1 <= iy0:
        raise ImageError(f"the crop of box {np.round(np.asarray(box, float)[:4], 1).tolist()} lies outside the "
                         f"{W}x{H} image")
    roi = image[iy0:iy1, ix0:ix1]
    a = A.copy()
    a[:, 2] += A[:, :2] @ np.array([ix0, iy0], dtype=np.float64)   # roi pixel -> crop pixel
    while a[0, 0] < 0.5 and min(roi.shape[:2]) >= 4:
        roi = cv2.pyrDown(roi)                     # pyramid pixel i sits at pixel 2i of the level below
        a[:, :2] *= 2.0
    return warp(np.ascontiguousarray(roi), a, size), A
