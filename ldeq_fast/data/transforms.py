"""Image normalisation, face-crop affines and warps.

Pixel convention (the one OpenCV's warps use): integer coordinates are pixel centres, x is the column,
y the row.  Keypoints normalised to [0,1] of a ``size``-pixel crop are ``pixels / size``; the published
code maps predictions back as ``keypoints * size`` in this convention, and so does everything here.

Affines are (2,3) float64 arrays mapping source pixels to destination pixels: ``dst = A[:, :2] @ src +
A[:, 2]``, the matrix ``cv2.warpAffine`` takes.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

# torchvision-style ImageNet statistics, applied to RGB images scaled to [0,1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_rgb_uint8(image, name: str = "image") -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or tensor, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 (0..255 RGB), got dtype {image.dtype}")
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., H, W, 3) RGB, got {tuple(image.shape)}")
    return image


def normalize_image(image) -> torch.Tensor:
    """uint8 RGB (H,W,3) (or a stack (...,H,W,3)) -> float32 tensor (3,H,W) (or (...,3,H,W)),
    scaled to [0,1] then standardised with the ImageNet mean/std."""
    image = _check_rgb_uint8(image)
    t = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).div_(255.0)
    t = t.movedim(-1, -3)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return ((t - mean) / std).contiguous()


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize_image`: (...,3,H,W) float tensor -> uint8 RGB (...,H,W,3),
    rounded and clipped to 0..255."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"denormalize expects a tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"denormalize expects a floating tensor, got dtype {tensor.dtype}")
    if tensor.ndim < 3 or tensor.shape[-3] != 3:
        raise ValueError(f"denormalize expects shape (..., 3, H, W), got {tuple(tensor.shape)}")
    t = tensor.detach().to("cpu", torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    t = (t * std + mean) * 255.0
    return t.round().clamp_(0, 255).to(torch.uint8).movedim(-3, -1).contiguous().numpy()


def _as_float_array(x, name: str, shape_tail: tuple, shape_desc: str | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < len(shape_tail) or a.shape[a.ndim - len(shape_tail):] != shape_tail:
        want = shape_desc or "(..., " + ", ".join(str(s) for s in shape_tail) + ")"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf: {a}")
    return a


def _scale_translate(scale: float, centre: np.ndarray, size: int) -> np.ndarray:
    """Affine scaling by ``scale`` that sends ``centre`` to (size/2, size/2)."""
    half = size / 2.0
    return np.array(
        [[scale, 0.0, half - scale * centre[0]], [0.0, scale, half - scale * centre[1]]], dtype=np.float64
    )


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return int(size)


def affine_from_bbox(bbox, extra_scale: float = 1.2, size: int = 256) -> np.ndarray:
    """WFLW-V frame crop from a detector box (x1, y1, x2, y2) (extra values after the 4th are ignored).

    Corners are rounded with ``int(v + 0.5)``; the square of side ``extra_scale * max(x2-x1, y2-y1)``
    centred on ``(x1 + w//2, y1 + h//2)`` (w = x2-x1+1, h = y2-y1+1) maps onto the ``size`` crop with its
    centre at (size/2, size/2), no rotation.  Built from three point pairs as the published rule states.
    """
    size = _check_size(size)
    if isinstance(bbox, torch.Tensor):
        bbox = bbox.detach().cpu().numpy()
    b = np.asarray(bbox, dtype=np.float64)
    if b.ndim != 1 or b.shape[0] < 4:
        raise ValueError(f"bbox must be a 1-D sequence of >= 4 values (x1, y1, x2, y2), got shape {b.shape}")
    if not np.isfinite(b[:4]).all():
        raise ValueError(f"bbox contains NaN or inf: {b[:4].tolist()}")
    if not extra_scale > 0:
        raise ValueError(f"extra_scale must be positive, got {extra_scale}")
    # int() truncates toward zero, as the published rounding does
    x1, y1, x2, y2 = (int(v + 0.5) for v in b[:4])
    if x2 < x1 or y2 < y1:
        raise ValueError(f"bbox has x2 < x1 or y2 < y1 after rounding: {(x1, y1, x2, y2)} from {b[:4].tolist()}")
    w, h = x2 - x1 + 1, y2 - y1 + 1
    centre = np.array([x1 + w // 2, y1 + h // 2], dtype=np.float64)
    # ceil/floor are no-ops on the rounded ints
    side = extra_scale * max(math.ceil(x2) - math.floor(x1), math.ceil(y2) - math.floor(y1))
    if side <= 0:
        raise ValueError(f"bbox {(x1, y1, x2, y2)} is degenerate (zero width and height after rounding)")
    half = size / 2.0
    src = np.array([centre, centre + (0.0, -side / 2), centre + (-side / 2, -side / 2)])
    dst = np.array([[half, half], [half, 0.0], [0.0, 0.0]])
    return affine_from_point_pairs(src, dst)


def affine_from_point_pairs(src, dst) -> np.ndarray:
    """The affine sending three source points (3,2) onto three destination points (3,2)."""
    s = _as_float_array(src, "src", (3, 2))
    d = _as_float_array(dst, "dst", (3, 2))
    lhs = np.concatenate([s, np.ones((3, 1))], axis=1)
    if abs(np.linalg.det(lhs)) < 1e-12:
        raise ValueError(f"source points are collinear, no unique affine: {s.tolist()}")
    return np.linalg.solve(lhs, d).T.copy()


def affine_from_points(points, bbox=None, scale: float = 1.2, size: int = 256) -> np.ndarray:
    """WFLW annotation-list crop: a square of side ``scale * max(w, h)`` centred on the extent (w, h) of
    the landmarks (K,2) -- joined with ``bbox`` (x_min, y_min, x_max, y_max) when given, so both the
    landmarks and the annotated box lie inside the crop -- mapped onto the ``size`` crop, no rotation."""
    size = _check_size(size)
    p = _as_float_array(points, "points", (2,), "(K, 2)")
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"points must have shape (K, 2) with K >= 1, got {p.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    lo, hi = p.min(axis=0), p.max(axis=0)
    if bbox is not None:
        b = _as_float_array(bbox, "bbox", (4,), "(4,) = (x_min, y_min, x_max, y_max)")
        if b.ndim != 1:
            raise ValueError(f"bbox must have shape (4,), got {b.shape}")
        if b[2] < b[0] or b[3] < b[1]:
            raise ValueError(f"bbox must be (x_min, y_min, x_max, y_max) with max >= min, got {b.tolist()}")
        lo, hi = np.minimum(lo, b[:2]), np.maximum(hi, b[2:])
    side = scale * float((hi - lo).max())
    if side <= 0:
        raise ValueError("points (and bbox) have zero extent; cannot size a crop")
    return _scale_translate(size / side, (lo + hi) / 2.0, size)


def invert_affine(A):
    """Inverse of a (...,2,3) affine (numpy or torch), in the same container type."""
    if isinstance(A, torch.Tensor):
        if A.shape[-2:] != (2, 3):
            raise ValueError(f"affine must have shape (..., 2, 3), got {tuple(A.shape)}")
        M = torch.linalg.inv(A[..., :2].to(torch.float64))
        t = -(M @ A[..., 2:].to(torch.float64))
        return torch.cat([M, t], dim=-1).to(A.dtype if A.is_floating_point() else torch.float64)
    a = _as_float_array(A, "affine", (2, 3))
    det = np.linalg.det(a[..., :2])
    if (np.abs(det) < 1e-12).any():
        raise ValueError("affine is singular (its 2x2 part has zero determinant); it has no inverse")
    M = np.linalg.inv(a[..., :2])
    return np.concatenate([M, -(M @ a[..., 2:])], axis=-1)


def apply_affine(points, A, inverse: bool = False):
    """Map points (...,K,2) through affine(s) (2,3) or (...,2,3) (broadcast over leading dims), or through
    their inverse.  numpy in -> float64 numpy out; torch in -> tensor of the points' float dtype."""
    if isinstance(points, torch.Tensor):
        if points.ndim < 2 or points.shape[-1] != 2:
            raise ValueError(f"points must have shape (..., K, 2), got {tuple(points.shape)}")
        if not torch.isfinite(points).all():
            raise ValueError("points contain NaN or inf")
        At = torch.as_tensor(A, dtype=torch.float64, device=points.device)
        if At.shape[-2:] != (2, 3):
            raise ValueError(f"affine must have shape (..., 2, 3), got {tuple(At.shape)}")
        if not torch.isfinite(At).all():
            raise ValueError("affine contains NaN or inf")
        if inverse:
            At = invert_affine(At)
        p = points.to(torch.float64)
        out = p @ At[..., :2].transpose(-1, -2) + At[..., None, :, 2]
        return out.to(points.dtype if points.is_floating_point() else torch.float32)
    p = _as_float_array(points, "points", (2,), "(..., K, 2)")
    if p.ndim < 2:
        raise ValueError(f"points must have shape (..., K, 2), got {p.shape}")
    a = invert_affine(A) if inverse else _as_float_array(A, "affine", (2, 3))
    return p @ np.swapaxes(a[..., :2], -1, -2) + a[..., None, :, 2]


def warp(image: np.ndarray, A, size) -> np.ndarray:
    """Resample ``image`` (H,W) or (H,W,C), uint8 or float32, through affine ``A`` (source -> crop pixels)
    into a crop of ``size`` (int: square, or (height, width)): bilinear, zero outside the source."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype not in (np.uint8, np.float32):
        raise TypeError(f"image must be uint8 or float32, got dtype {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image must have shape (H, W) or (H, W, C) with C in 1/3/4, got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        h, w = (_check_size(s) for s in size)
    else:
        h = w = _check_size(size)
    a = _as_float_array(A, "affine", (2, 3))
    if a.shape != (2, 3):
        raise ValueError(f"affine must have shape (2, 3), got {a.shape}")
    out = cv2.warpAffine(np.ascontiguousarray(image), a, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if image.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel axis
        out = out[:, :, None]
    return out


def pad_crop(image: np.ndarray, kpts) -> tuple[np.ndarray, np.ndarray]:
    """The published rule for pre-cropped images whose landmarks overflow them.

    ``kpts`` (K,2) are normalised to the (H,W) ``image``.  If any landmark lies more than half a pixel
    outside, every overflowing side gets a zero border of ``ceil(overflow_px) + 8`` pixels, the padded
    image is resized back to (H,W) and the landmarks are mapped into it.  Returns (image, kpts float32
    clipped to [0,1]); without overflow the image is returned unchanged and the landmarks only clipped.
    """
    image = _check_rgb_uint8(image)
    if image.ndim != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    k = _as_float_array(kpts, "kpts", (2,), "(K, 2)")
    if k.ndim != 2:
        raise ValueError(f"kpts must have shape (K, 2), got {k.shape}")
    H, W = image.shape[:2]
    x, y = k[:, 0], k[:, 1]
    # overflow in pixels: left, right, top, bottom
    left, right = max(0.0, -x.min()) * W, max(0.0, x.max() - 1.0) * W
    top, bottom = max(0.0, -y.min()) * H, max(0.0, y.max() - 1.0) * H
    if max(left, right, top, bottom) <= 0.5:
        return image, np.clip(k, 0.0, 1.0).astype(np.float32)
    pl, pr, pt, pb = (math.ceil(o) + 8 if o > 0 else 0 for o in (left, right, top, bottom))
    padded = cv2.copyMakeBorder(np.ascontiguousarray(image), pt, pb, pl, pr, cv2.BORDER_CONSTANT, value=0)
    out = cv2.resize(padded, (W, H), interpolation=cv2.INTER_LINEAR)
    # cv2.resize maps source pixel centre s to (s + 0.5) * out/in - 0.5
    sx, sy = W / (W + pl + pr), H / (H + pt + pb)
    new = np.empty_like(k)
    new[:, 0] = ((x * W + pl + 0.5) * sx - 0.5) / W
    new[:, 1] = ((y * H + pt + 0.5) * sy - 0.5) / H
    return out, np.clip(new, 0.0, 1.0).astype(np.float32)
