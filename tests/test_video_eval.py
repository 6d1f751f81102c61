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


def test_method_table(tiny_model):
    clips = synthetic_clips(2, 5, size=128, seed=0)
    val = synthetic_clips(1, 5, size=128, seed=1)
    rows, preds = evaluate_video_methods(tiny_model, clips, val, slots=2, filters=("ema",))
    names = [r["method"] for r in rows]
    assert names == ["per_frame", "per_frame+ema", "rwr_warm", "rwr_prox"]
    for r in rows:
        assert np.isfinite(r["nme"]) and np.isfinite(r["nmf"]) and len(r["per_video_nmf"]) == 2
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
