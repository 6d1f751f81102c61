"""Landmark smoothing baselines on signals with known answers."""

import numpy as np
import pytest

from ldeq_fast.video.filters import FILTERS, ema, kalman_cv, one_euro, tune_filter

FPS = 30.0
SETTINGS = {
    "ema": {"alpha": 0.3},
    "one_euro": {"min_cutoff": 0.5, "beta": 0.01},
    "kalman_cv": {"process_noise": 50.0, "measurement_noise": 2.0},
}


def run(name, x, **kw):
    fn = FILTERS[name][0]
    return fn(x, **{**SETTINGS[name], **kw})


def signal(values):
    """(T,) -> (T, 1, 2) with the same track on x and y."""
    v = np.asarray(values, np.float64)
    return np.stack([v, v], axis=-1)[:, None, :]


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_constant_signal_is_unchanged(name):
    rng = np.random.default_rng(0)
    const = np.broadcast_to(rng.uniform(0, 300, (1, 7, 2)), (25, 7, 2))
    out = run(name, const)
    np.testing.assert_allclose(out, const, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_shape_dtype_causality_and_independence(name):
    rng = np.random.default_rng(1)
    x = rng.normal(100, 5, (13, 3, 2)).astype(np.float32)
    out = run(name, x)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], x[0])
    # causal: changing the future leaves the past alone
    y = x.copy()
    y[9:] += 50
    np.testing.assert_array_equal(run(name, y)[:9], out[:9])
    # each coordinate is its own signal
    np.testing.assert_allclose(run(name, x[:, 1:2, 1:2].repeat(2, 2))[..., 0], out[:, 1:2, 1], rtol=1e-6)
    # minimal shapes
    assert run(name, x[:1, :1]).shape == (1, 1, 2)
    assert run(name, np.arange(10).reshape(5, 1, 2)).dtype == np.float64


def test_ema_step_follows_the_analytic_curve():
    alpha, t0, T = 0.27, 5, 40
    x = signal(np.where(np.arange(T) >= t0, 3.0, 0.0))
    y = ema(x, alpha)[:, 0, 0]
    k = np.arange(T - t0)
    expect = np.concatenate([np.zeros(t0), 3.0 * (1.0 - (1.0 - alpha) ** (k + 1))])
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ema(x, 1.0), x)


def test_kalman_converges_on_a_noiseless_constant_velocity_track():
    t = np.arange(90) / FPS
    truth = 40.0 + 120.0 * t  # 4 px per frame
    y = kalman_cv(signal(truth), process_noise=10.0, measurement_noise=1.0)[:, 0, 0]
    err = np.abs(y - truth)
    assert err[0] == 0 and err[5] > 0.05  # starts with zero velocity, so it lags at first
    assert err[-10:].max() < 1e-3 * 4.0


def test_kalman_reduces_noise_on_a_noisy_track():
    rng = np.random.default_rng(2)
    t = np.arange(600) / FPS
    truth = np.stack([50 + 60 * t, 200 - 30 * t], 1)[:, None, :].repeat(5, 1)
    noisy = truth + rng.normal(0, 2.0, truth.shape)
    y = kalman_cv(noisy, process_noise=5.0, measurement_noise=2.0)
    raw_var = ((noisy - truth)[60:] ** 2).mean()
    filt_var = ((y - truth)[60:] ** 2).mean()
    assert filt_var < 0.25 * raw_var, (filt_var, raw_var)


def test_one_euro_smooths_slow_motion_and_follows_fast_motion():
    rng = np.random.default_rng(3)
    t = np.arange(300) / FPS
    slow = 100 + 3 * np.sin(2 * np.pi * 0.1 * t)
    noisy = slow + rng.normal(0, 1.0, t.shape)
    y = one_euro(signal(noisy), min_cutoff=0.5, beta=0.01)[:, 0, 0]
    jitter_in = np.diff(noisy - slow)[30:].std()
    jitter_out = np.diff(y - slow)[30:].std()
    assert jitter_out < 0.3 * jitter_in, (jitter_out, jitter_in)
    assert np.abs(y - slow)[30:].mean() < 0.7 * np.abs(noisy - slow)[30:].mean()

    fast = 20 + 600 * t  # 20 px per frame
    lag_adaptive = np.abs(one_euro(signal(fast), min_cutoff=0.5, beta=0.01)[:, 0, 0] - fast)[30:].mean()
    lag_fixed = np.abs(one_euro(signal(fast), min_cutoff=0.5, beta=0.0)[:, 0, 0] - fast)[30:].mean()
    assert lag_adaptive < 0.2 * lag_fixed, (lag_adaptive, lag_fixed)
    assert lag_adaptive < 1.5 * 20  # under ~1.5 frames of motion


def mean_abs_error(preds, gts):
    return float(np.mean([np.abs(p - g).mean() for p, g in zip(preds, gts)]))


def test_tune_filter_finds_the_obvious_best():
    rng = np.random.default_rng(4)
    walks = [np.cumsum(rng.normal(0, 3, (40, 4, 2)), 0) for _ in range(3)]
    best, score, table = tune_filter("ema", walks, walks, mean_abs_error, grid={"alpha": [0.2, 0.6, 1.0]})
    assert best == {"alpha": 1.0} and score == 0.0
    assert [row["alpha"] for row in table] == [0.2, 0.6, 1.0] and table[0]["score"] > table[1]["score"] > 0

    gt = [np.full((80, 2, 2), 10.0)]
    noisy = [g + rng.normal(0, 2, g.shape) for g in gt]
    best, score, table = tune_filter("kalman_cv", noisy, gt, mean_abs_error, fps=25.0,
                                     grid={"process_noise": [0.0, 1e4], "measurement_noise": [2.0]})
    assert best == {"process_noise": 0.0, "measurement_noise": 2.0} and len(table) == 2
    assert score == min(row["score"] for row in table)

    best, _, table = tune_filter("one_euro", noisy, gt, mean_abs_error)
    grid = FILTERS["one_euro"][1]
    assert len(table) == len(grid["min_cutoff"]) * len(grid["beta"])
    assert best["min_cutoff"] == min(grid["min_cutoff"])


def test_bad_input_is_rejected():
    x = np.zeros((10, 3, 2))
    bad = x.copy()
    bad[4, 1, 0] = np.nan
    with pytest.raises(ValueError, match="frame 4, landmark 1"):
        ema(bad, 0.5)
    with pytest.raises(ValueError, match=r"\(T, K, 2\)"):
        one_euro(np.zeros((10, 3)), 1.0, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        ema(x, 0.0)
    with pytest.raises(ValueError, match="measurement_noise"):
        kalman_cv(x, 1.0, 0.0)
    with pytest.raises(ValueError, match="min_cutoff"):
        one_euro(x, -1.0, 0.0)
    with pytest.raises(ValueError, match="unknown filter"):
        tune_filter("median", [x], [x], mean_abs_error)
    with pytest.raises(ValueError, match="no parameter"):
        tune_filter("ema", [x], [x], mean_abs_error, grid={"beta": [1.0]})
    with pytest.raises(ValueError, match="differ in shape"):
        tune_filter("ema", [x], [x[:5]], mean_abs_error)
    with pytest.raises(ValueError, match="NaN"):
        tune_filter("ema", [x], [x], lambda p, g: float("nan"), grid={"alpha": [0.5]})
