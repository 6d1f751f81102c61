"""Conventional landmark smoothing baselines for per-frame predictions on one video.

Every filter takes predictions (T, K, 2), is causal (frame t uses frames <= t only), starts from the
first prediction, treats each of the K x 2 coordinates as an independent scalar signal (vectorised over
them, looping over time only) and returns an array of the same shape and floating dtype.  Arithmetic is
float64 internally.

The default parameter grids in ``FILTERS`` assume coordinates in pixels of frames a few hundred pixels
across at ~30 fps; pass your own grid to ``tune_filter`` for other units.
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Callable

import numpy as np

__all__ = ["one_euro", "ema", "kalman_cv", "FILTERS", "tune_filter"]


def _check_preds(preds) -> tuple[np.ndarray, np.dtype]:
    a = np.asarray(preds)
    if a.ndim != 3 or a.shape[2] != 2:
        raise ValueError(f"predictions must have shape (T, K, 2), got {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"predictions are empty: shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"predictions must be real numbers, got dtype {a.dtype}")
    finite = np.isfinite(a)
    if not finite.all():
        t, k, c = np.argwhere(~finite)[0]
        raise ValueError(f"predictions contain NaN/inf (first at frame {t}, landmark {k}, coordinate {c})")
    out_dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)
    return a.astype(np.float64), out_dtype


def _positive(name, value, allow_zero=False):
    v = float(value)
    if not (v >= 0 if allow_zero else v > 0) or not math.isfinite(v):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return v


def ema(preds, alpha: float) -> np.ndarray:
    """Exponential moving average y_t = alpha * x_t + (1 - alpha) * y_{t-1}, y_0 = x_0.
    alpha in (0, 1]; 1 returns the input."""
    x, dtype = _check_preds(preds)
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    y = np.empty_like(x)
    y[0] = x[0]
    for t in range(1, len(x)):
        y[t] = alpha * x[t] + (1.0 - alpha) * y[t - 1]
    return y.astype(dtype)


def _smoothing_factor(cutoff_hz, dt):
    """Weight of the new sample for a first-order low-pass with this cutoff sampled every dt."""
    tau = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


def one_euro(preds, min_cutoff: float, beta: float, d_cutoff: float = 1.0, fps: float = 30.0) -> np.ndarray:
    """One Euro filter (Casiez et al., CHI 2012): a first-order low-pass whose cutoff is
    ``min_cutoff + beta * |smoothed speed|`` (Hz; speed in coordinate units per second, itself low-passed
    at ``d_cutoff`` Hz).  Slow motion is smoothed hard (less jitter), fast motion passes (less lag)."""
    x, dtype = _check_preds(preds)
    min_cutoff = _positive("min_cutoff", min_cutoff)
    beta = _positive("beta", beta, allow_zero=True)
    d_cutoff = _positive("d_cutoff", d_cutoff)
    fps = _positive("fps", fps)
    dt = 1.0 / fps
    a_d = _smoothing_factor(d_cutoff, dt)
    y = np.empty_like(x)
    y[0] = x[0]
    speed = np.zeros_like(x[0])
    for t in range(1, len(x)):
        speed = a_d * (x[t] - y[t - 1]) * fps + (1.0 - a_d) * speed
        a = _smoothing_factor(min_cutoff + beta * np.abs(speed), dt)
        y[t] = a * x[t] + (1.0 - a) * y[t - 1]
    return y.astype(dtype)


def kalman_cv(preds, process_noise: float, measurement_noise: float, fps: float = 30.0) -> np.ndarray:
    """Constant-velocity Kalman filter per coordinate, state [position, velocity]; returns the filtered
    (posterior) positions.

    process_noise: std of the white acceleration, units / s^2 (piecewise-constant over a frame:
    Q = q^2 [[dt^4/4, dt^3/2], [dt^3/2, dt^2]]).  measurement_noise: std of a per-frame prediction's
    error, units.  Starts at the first prediction with zero velocity, position variance r^2 and velocity
    variance 2 (r * fps)^2 (the variance of a two-frame finite difference).
    """
    x, dtype = _check_preds(preds)
    q = _positive("process_noise", process_noise, allow_zero=True)
    r = _positive("measurement_noise", measurement_noise)
    fps = _positive("fps", fps)
    dt = 1.0 / fps
    q00, q01, q11 = q * q * dt**4 / 4.0, q * q * dt**3 / 2.0, q * q * dt**2
    r2 = r * r

    pos = x[0].copy()
    vel = np.zeros_like(pos)
    p00 = np.full_like(pos, r2)
    p01 = np.zeros_like(pos)
    p11 = np.full_like(pos, 2.0 * r2 * fps * fps)
    y = np.empty_like(x)
    y[0] = pos
    for t in range(1, len(x)):
        # predict
        pos = pos + dt * vel
        p00 = p00 + dt * (2.0 * p01 + dt * p11) + q00
        p01 = p01 + dt * p11 + q01
        p11 = p11 + q11
        # update with the measurement x[t] of the position
        s = p00 + r2
        k0, k1 = p00 / s, p01 / s
        innov = x[t] - pos
        pos = pos + k0 * innov
        vel = vel + k1 * innov
        p11 = p11 - k1 * p01
        p00, p01 = (1.0 - k0) * p00, (1.0 - k0) * p01
        y[t] = pos
    return y.astype(dtype)


FILTERS: dict[str, tuple[Callable, dict]] = {
    "one_euro": (one_euro, {"min_cutoff": [0.05, 0.1, 0.3, 1.0, 3.0], "beta": [0.0, 0.001, 0.003, 0.01, 0.03, 0.1]}),
    "ema": (ema, {"alpha": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}),
    "kalman_cv": (
        kalman_cv,
        {"process_noise": [10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0], "measurement_noise": [0.5, 1.0, 2.0, 4.0, 8.0]},
    ),
}


def tune_filter(name: str, videos_preds, videos_gt, metric_fn: Callable, grid: dict | None = None,
                **fixed) -> tuple[dict, float, list[dict]]:
    """Grid-search a filter's parameters on a validation set of videos, minimising
    ``metric_fn(filtered_preds_list, gt_list) -> float``.

    grid: {parameter: list of values} (default: the filter's grid in ``FILTERS``); ``fixed`` keyword
    arguments (e.g. ``fps=25``) go to every call.  Returns (best_params, best_score, table) where table
    lists every combination tried, in order, as dicts of the parameters plus 'score'.  Ties keep the
    first combination.
    """
    if name not in FILTERS:
        raise ValueError(f"unknown filter {name!r}; known: {sorted(FILTERS)}")
    fn, default_grid = FILTERS[name]
    grid = default_grid if grid is None else grid
    accepted = set(inspect.signature(fn).parameters) - {"preds"}
    unknown = (set(grid) | set(fixed)) - accepted
    if unknown:
        raise ValueError(f"filter {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(accepted)}")
    if overlap := set(grid) & set(fixed):
        raise ValueError(f"parameter(s) {sorted(overlap)} given both in the grid and as fixed arguments")
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise ValueError(f"grid must give at least one value for each parameter, got {grid!r}")
    videos_preds, videos_gt = list(videos_preds), list(videos_gt)
    if len(videos_preds) != len(videos_gt) or not videos_preds:
        raise ValueError(f"need the same non-zero number of prediction and ground-truth videos, got "
                         f"{len(videos_preds)} and {len(videos_gt)}")
    for i, (p, g) in enumerate(zip(videos_preds, videos_gt)):
        if np.shape(p) != np.shape(g):
            raise ValueError(f"video {i}: predictions {np.shape(p)} and ground truth {np.shape(g)} differ in shape")

    names = list(grid)
    table, best_params, best_score = [], None, math.inf
    for values in itertools.product(*(grid[k] for k in names)):
        params = dict(zip(names, values))
        filtered = [fn(p, **params, **fixed) for p in videos_preds]
        score = float(metric_fn(filtered, videos_gt))
        if math.isnan(score):
            raise ValueError(f"metric_fn returned NaN for {name} {params}")
        table.append({**params, "score": score})
        if score < best_score or best_params is None:
            best_params, best_score = params, score
    return best_params, best_score, table
