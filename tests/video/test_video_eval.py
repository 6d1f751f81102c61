import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldeq_fast import LDEQ, LDEQConfig, metrics
from ldeq_fast.model import save_weights
from ldeq_fast.video.evaluate import PROX_GRID, evaluate_video_methods, synthetic_clips, tune_tracker


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LDEQ(LDEQConfig.small(injection_width=16, cell_base_width=16, cell_width_increment=4, max_iters=3,
                                 backend="torch")).eval()


def test_jitter_free_prediction_has_zero_flicker():
    clip = synthetic_clips(1, 6, size=128, seed=3)[0]
    assert metrics.video_nmf(clip.landmarks, clip.landmarks) == 0.0
    assert metrics.video_nmf(clip.landmarks + np.array([3.0, -2.0]), clip.landmarks) == 0.0
    assert metrics.video_nme(clip.landmarks, clip.landmarks) == 0.0


def test_a_filter_reduces_the_flicker_of_a_noisy_track():
    # ground truth + iid noise of 1% of the image per frame: an EMA at alpha 0.5 cuts the frame-to-frame noise
    # variance from 2 s^2 to 2a/(2-a) a s^2 = s^2/3, far more than the lag it adds to the slow synthetic motion
    from ldeq_fast.video.filters import ema

    clip = synthetic_clips(1, 40, size=128, seed=4)[0]
    noisy = clip.landmarks + np.random.default_rng(0).normal(0.0, 1.28, clip.landmarks.shape)
    raw, smooth = metrics.video_nmf(noisy, clip.landmarks), metrics.video_nmf(ema(noisy, 0.5), clip.landmarks)
    assert smooth < 0.7 * raw, (smooth, raw)


def test_method_table(tiny_model):
    clips = synthetic_clips(2, 5, size=128, seed=0)
    val = synthetic_clips(1, 5, size=128, seed=1)
    rows, preds = evaluate_video_methods(tiny_model, clips, val, slots=2, filters=("ema",))
    names = [r["method"] for r in rows]
    assert names == ["per_frame", "per_frame+ema", "rwr_warm", "rwr_prox"]
    for r in rows:   # each row's figures are the metrics of its predictions (the first clip's are returned)
        first = preds[r["method"]][0]
        assert r["per_video_nme"][0] == pytest.approx(metrics.video_nme(first, clips[0].landmarks), rel=1e-12)
        assert r["per_video_nmf"][0] == pytest.approx(metrics.video_nmf(first, clips[0].landmarks), rel=1e-12)
        assert len(r["per_video_nmf"]) == 2 and r["nme"] == pytest.approx(np.mean(r["per_video_nme"]))
        assert r["nmf"] == pytest.approx(np.mean(r["per_video_nmf"])) and r["nme"] > 0
    # the EMA row is the tuned EMA of the per-frame predictions, not another run
    from ldeq_fast.video.filters import ema
    np.testing.assert_allclose(preds["per_frame+ema"][0], ema(preds["per_frame"][0], **rows[1]["params"]))
    assert not np.allclose(preds["rwr_warm"][0], preds["per_frame"][0])   # warm starts change the answer
    assert rows[1]["params"] is not None and "alpha" in rows[1]["params"]
    assert rows[3]["params"] in PROX_GRID               # prox tuned on the validation video
    assert preds["rwr_warm"][0].shape == clips[0].landmarks.shape


def test_tune_tracker_picks_the_best_setting_by_the_objective(tiny_model):
    val = synthetic_clips(1, 5, size=128, seed=2)
    grid = [{"gamma": 0.0}, {"gamma": 8.0}]

    def flicker(preds, gt):
        return float(np.mean([metrics.video_nmf(p, g) for p, g in zip(preds, gt)]))

    best, table = tune_tracker(tiny_model, val, flicker, grid, slots=1, mode="prox", motion="none")
    assert [row["gamma"] for row in table] == [0.0, 8.0]
    assert "score" not in best
    assert best["gamma"] == min(table, key=lambda row: row["score"])["gamma"]
    # a strong pull toward the previous state holds the landmarks still: less flicker than no pull
    assert table[1]["score"] < table[0]["score"]


def test_video_cli_smoke(tiny_model, tmp_path):
    save_weights(tiny_model, tmp_path, "m")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "video", "--model", str(tmp_path / "m.pt"),
                           "--videos", "1", "--val-videos", "1", "--frames", "4", "--slots", "2", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rwr_warm" in proc.stdout and "frames/s" in proc.stdout
    res = json.loads((out / "video_results.json").read_text())
    assert res["machine"]["cores"] >= 1
    assert (out / "trajectory.png").stat().st_size > 0 and (out / "clip.gif").stat().st_size > 0
