"""Landmark metrics: NME (inter-ocular), FR and AUC at a threshold, per-video NME and NMF (flicker).

All functions take numpy arrays or tensors of shape (N, K, 2) (images) or (T, K, 2) (one video), in any
consistent unit (NME and NMF are scale-free).
"""
from __future__ import annotations

import numpy as np
from scipy.integrate import simpson

INTEROCULAR = {98: (60, 72), 68: (36, 45)}


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3 or a.shape[-1] != 2:
        raise ValueError(f"landmarks must have shape (N, K, 2), got {a.shape}")
    return a


def _norm_indices(k: int, norm_indices):
    if norm_indices is not None:
        return tuple(norm_indices)
    if k not in INTEROCULAR:
        raise ValueError(f"no default inter-ocular indices for {k} keypoints; pass norm_indices=(i, j)")
    return INTEROCULAR[k]


def nme_per_image(pred, gt, norm_indices=None) -> np.ndarray:
    """Mean point-to-point error over keypoints / inter-ocular distance of the ground truth, per image (N,)."""
    p, g = _np(pred), _np(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    a, b = _norm_indices(g.shape[1], norm_indices)
    d = np.linalg.norm(g[:, a] - g[:, b], axis=1)
    if np.any(d <= 0):
        raise ValueError("zero inter-ocular distance in the ground truth")
    return np.linalg.norm(p - g, axis=2).mean(axis=1) / d


def fr_auc(nmes, threshold: float = 0.1, step: float = 1e-4):
    """(failure rate, AUC) of the cumulative error distribution up to ``threshold``.

    FR = fraction of images with NME > threshold; AUC = Simpson integral of the CED over
    [0, threshold] sampled every ``step``, divided by threshold."""
    e = np.asarray(nmes, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("no NME values")
    xs = np.arange(0.0, threshold + step, step)
    ced = (e[None, :] <= xs[:, None]).mean(axis=1)
    return float(1.0 - ced[-1]), float(simpson(ced, x=xs) / threshold)


def nme_fr_auc(pred, gt, norm_indices=None, threshold: float = 0.1):
    """Dataset summary: (NME, FR@threshold, AUC@threshold), NME as a fraction (x100 for %)."""
    e = nme_per_image(pred, gt, norm_indices)
    fr, auc = fr_auc(e, threshold)
    return float(e.mean()), fr, auc


def video_nme(pred, gt, norm_indices=None) -> float:
    """Per-video NME in percent: mean over frames of the per-frame NME."""
    return float(100.0 * nme_per_image(pred, gt, norm_indices).mean())


def face_scale(gt, ref_size: float = 256.0) -> np.ndarray:
    """Per-frame face size sqrt(x-range * y-range) of the ground truth, in units of ``ref_size``."""
    g = _np(gt)
    xr = g[:, :, 0].max(1) - g[:, :, 0].min(1)
    yr = g[:, :, 1].max(1) - g[:, :, 1].min(1)
    return np.sqrt(xr * yr / ref_size ** 2)


def video_nmf(pred, gt, ref_size: float = 256.0) -> float:
    """Normalised mean flicker of one video (the published NMJ).

    e_t = gt_t - pred_t; flicker of keypoint k between frames t-1 and t is 100 ||e_t - e_{t-1}|| / s_t with
    s_t the face scale of frame t; RMS over keypoints, then RMS over frame pairs.  A prediction that
    follows the ground truth with a constant offset has zero flicker."""
    p, g = _np(pred), _np(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    if p.shape[0] < 2:
        raise ValueError("NMF needs at least 2 frames")
    e = g - p
    s = face_scale(g, ref_size)[1:, None]
    jumps = 100.0 * np.linalg.norm(e[1:] - e[:-1], axis=2) / s
    return float(np.sqrt(np.mean(np.sqrt(np.mean(jumps ** 2, axis=1)) ** 2)))


def video_nme_nmf(pred, gt, norm_indices=None, ref_size: float = 256.0):
    return video_nme(pred, gt, norm_indices), video_nmf(pred, gt, ref_size)
