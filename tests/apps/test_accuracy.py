"""Accuracy per cell evaluation (ldeq_fast/accuracy.py), fit-init (ldeq_fast/fit_init.py) and their commands."""
import json
import subprocess
import sys

import pytest
import torch

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.accuracy import (
    distance_to,
    format_accuracy,
    nme_normaliser,
    plot_accuracy,
    predict,
    recommend,
    run_accuracy,
    setting_for,
)
from ldeq_fast.fit_init import FitConfig, fit_initial_state, load_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**changes):
    torch.manual_seed(0)
    return LDEQ(LDEQConfig.small(max_iters=3, **changes)).eval()


def _images(n, seed=1):
    return torch.randn(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


class _CountCalls:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


@pytest.mark.parametrize("method", ["fpi", "anderson"])
def test_settings_spend_exactly_their_evaluations(method):
    model = _model()
    counter = _CountCalls(model.deq_layer.cell)
    for evals in (1, 2, 3, 5):
        counter.n = 0
        predict(model, _images(2), setting_for(evals, method), init=False)
        assert counter.n == evals, (evals, counter.n)
    assert model.cfg.max_iters == 3 and not model.cfg.take_one_less_inference_step   # the config is restored
    with pytest.raises(ValueError):
        setting_for(0, method)


def test_distance_is_an_nme_against_the_reference():
    ref = torch.rand(4, 98, 2)
    assert float(distance_to(ref, ref).max()) == 0
    shifted = ref + torch.tensor([0.01, 0.0])
    torch.testing.assert_close(distance_to(shifted, ref), 0.01 / nme_normaliser(ref))
    assert nme_normaliser(torch.rand(3, 19, 2)).shape == (3,)      # a layout without inter-ocular indices


def _fake_result(labels=True):
    pts = lambda vals, z0_cost: [{"evals": e, "cost_evals": e + z0_cost, "setting": setting_for(e, "fpi"),  # noqa: E731
                                  "nme": v, "vs_converged": v - 0.0395} for e, v in zip((1, 2, 3), vals)]
    return {"labels": labels, "converged_nme": 0.0470, "images": 4, "evals": [1, 2, 3], "converged_iters": 50,
            "converged_solver": "anderson", "init_cost": None,
            "curves": [{"method": "fpi", "z0": "zeros", "init_cost_evals": 0, "points": pts((0.06, 0.05, 0.0473), 0)},
                       {"method": "fpi", "z0": "learned", "init_cost_evals": 0.1,
                        "points": pts((0.05, 0.0474, 0.0471), 0.1)}]}


def test_recommendation_is_the_cheapest_within_the_budget():
    res = _fake_result()
    rec = recommend(res, within_pct=1.0)         # limit 0.04747
    assert (rec["z0"], rec["evals"]) == ("learned", 2) and rec["setting"] == setting_for(2, "fpi")
    assert recommend(res, within_pct=0.5)["z0"] == "learned" and recommend(res, within_pct=0.5)["evals"] == 3
    assert recommend(res, within_pct=0.01)["setting"] is None
    res = _fake_result(labels=False)             # without labels: distance to the converged answer
    rec = recommend(res, within_pct=1.0)
    assert rec["rule"].startswith("distance") and (rec["z0"], rec["evals"]) == ("learned", 2)   # 0.0079 at 2.1


def test_run_accuracy_with_and_without_init(tmp_path):
    model = _model()
    x = _images(3)
    res = run_accuracy(model, x, None, evals=(1, 2, 3), converged_iters=6, progress=False)
    assert [c["z0"] for c in res["curves"]] == ["zeros", "zeros"] and not res["labels"]
    from ldeq_fast.model.init_state import new_initial_state

    model.set_initial_state(new_initial_state(model))
    labels = torch.rand(3, 98, 2)
    res = run_accuracy(model, x, labels, evals=(1, 2), converged_iters=6, progress=False)
    assert {(c["method"], c["z0"]) for c in res["curves"]} == {(m, z) for m in ("fpi", "anderson")
                                                               for z in ("zeros", "learned")}
    learned = next(c for c in res["curves"] if c["z0"] == "learned")
    assert 0 < learned["init_cost_evals"] <= 0.15
    assert all(p["cost_evals"] == p["evals"] + learned["init_cost_evals"] for p in learned["points"])
    assert set(res["init_cost"]["time_ratio"]) == {"1", "3"} and "nme" in res["init_alone"]
    res["recommendation"] = recommend(res)
    assert "learned init cost" in format_accuracy(res)
    plot_accuracy(res, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000
    assert model.initial_state is not None      # predict(init=False) put it back


def test_fit_init_runs_and_beats_a_fresh_init():
    model = _model(solver="fpi")
    x = _images(24)
    cfg = FitConfig(map_steps=40, steps=6, batch_size=8, unroll=1, converged_iters=6, eval_every=3, lr=1e-2)
    h, rep = fit_initial_state(model, x, cfg, progress=False)
    assert model.initial_state is None                    # the caller's model is not changed
    assert rep["train_images"] + rep["val_images"] == 24 and rep["cost"]["ratio"] < 0.15
    assert set(rep["val_vs_converged"]) == {"1", "2", "3"}
    # the maps stage moved the peaks toward the converged keypoints (from the centre)
    maps = next(r for r in rep["history"] if r.get("stage") == "maps")
    assert maps["train_loss"] < 0.8 * maps["first_loss"]
    with pytest.raises(ValueError, match="images must be"):
        fit_initial_state(model, torch.randn(4, 3, 64, 64), cfg, progress=False)
    with pytest.raises(ValueError):
        FitConfig(map_steps=0, steps=0)


def test_image_folder(tmp_path):
    import cv2
    import numpy as np

    (tmp_path / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "a.png"), np.full((40, 60, 3), 200, np.uint8))
    cv2.imwrite(str(tmp_path / "sub" / "b.jpg"), np.zeros((90, 70, 3), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    notes = []
    imgs = load_image_folder(tmp_path, 32, report=notes.append)
    assert imgs.shape == (2, 3, 32, 32) and any("broken.jpg" in n for n in notes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty", 32)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing", 32)


def test_fit_init_and_bench_accuracy_commands(tmp_path):
    out = tmp_path / "demo.init.pt"
    fit = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "fit-init", "--model", "demo", "--synthetic", "8",
                          "--map-steps", "4", "--steps", "2", "--batch-size", "4", "--converged-iters", "3",
                          "--no-progress", "--out", str(out), "--json", str(tmp_path / "fit.json")],
                         capture_output=True, text=True, timeout=900)
    assert fit.returncode == 0, fit.stderr
    assert out.is_file() and "cell evaluations" in fit.stdout
    assert json.loads((tmp_path / "fit.json").read_text())["data"]["synthetic"] == 8
    acc = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "bench", "--accuracy", "--init", str(out),
                          "--stills", "4", "--evals", "1,2", "--converged-iters", "3", "--no-progress",
                          "--json", str(tmp_path / "acc.json"), "--png", str(tmp_path / "acc.png")],
                         capture_output=True, text=True, timeout=900)
    assert acc.returncode == 0, acc.stderr
    res = json.loads((tmp_path / "acc.json").read_text())
    assert res["labels"] and len(res["curves"]) == 4 and res["machine"]["cpu"] and res["recommendation"]["rule"]
    assert (tmp_path / "acc.png").is_file() and "recommendation" in acc.stdout
    bad = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "fit-init", "--model", "demo"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "exactly one of" in bad.stderr
