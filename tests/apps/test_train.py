import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch
from conftest import needs_cpp

from ldeq_fast import metrics
from ldeq_fast.data.wflw import WFLWCropped
from ldeq_fast.model.checkpoint import CheckpointError
from ldeq_fast.model.weights import load_weights
from ldeq_fast.solvers.stats import SolverStats
from ldeq_fast.train import TrainConfig, Trainer, parse_overrides, solve_summary

# the reference path and the fast one (backend 'auto': the fused C++ ops on CPU)
BACKENDS = ["torch", pytest.param("auto", marks=needs_cpp)]


def write_wflw_cropped(root, split, n, size=128, seed=0):
    """A tiny pre-cropped WFLW split: blobs drawn at random landmark positions."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        pts = rng.uniform(0.2, 0.8, size=(98, 2))
        pts[60], pts[72] = [0.35, 0.4], [0.65, 0.4]
        img = np.full((size, size, 3), 40, np.uint8)
        for j, (x, y) in enumerate(pts):
            cv2.circle(img, (int(x * size), int(y * size)), 2, (50 + 2 * j % 200, 120, 200), -1)
        cv2.imwrite(str(root / split / f"{i}.png"), img)
        lines.append(f"{i}.png " + " ".join(f"{v:.5f}" for v in pts.ravel()))
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def wflw(tmp_path):
    root = tmp_path / "wflw"
    write_wflw_cropped(root, "train", 6)
    write_wflw_cropped(root, "test", 3, seed=1)
    return root


def cfg(root, out, backend="torch", **kw):
    base = dict(out_dir=str(out), data="wflw_cropped", data_root=str(root), model_preset="small",
                model={"max_iters": 2, "backend": backend, "injection_width": 16, "cell_base_width": 16,
                       "cell_width_increment": 4},
                steps=4, batch_size=2, warmup_steps=2, eval_every=100, ckpt_every=100, log_every=1,
                progress=False, augment=True, ema_decay=0.5)
    base.update(kw)
    return TrainConfig.from_dict(base)


def rows_of(out, kind):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_outputs_and_exact_resume(wflw, tmp_path, backend):
    full = Trainer(cfg(wflw, tmp_path / "a", backend))
    res = full.fit()
    out = tmp_path / "a"
    # the reported metrics are those of the exported (EMA) model on the test split, recomputed here
    exported = load_weights(out / "model.pt")
    assert exported.cfg == full.model.cfg
    test = WFLWCropped(wflw, "test", image_size=128)
    with torch.no_grad():
        pred = exported(torch.stack([test[i]["image"] for i in range(len(test))])).keypoints
    nme, fr, auc = metrics.nme_fr_auc(pred, torch.stack([test[i]["kpts"] for i in range(len(test))]))
    assert set(res) == {"test"} and res["test"]["n"] == 3
    assert res["test"]["nme"] == pytest.approx(nme, rel=1e-5) and res["test"]["auc"] == pytest.approx(auc, abs=1e-6)
    train_rows = rows_of(out, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:   # both solves' statistics, as fractions of the batch of 2
        assert r["bwd_iters"] is not None and not r["skipped"] and r["skipped_steps"] == 0
        assert {r[f"{s}_{k}"] for s in ("fwd", "bwd") for k in ("converged", "diverged")} <= {0.0, 0.5, 1.0}
    assert (out / "curves.png").stat().st_size > 0

    interrupted = Trainer(cfg(wflw, tmp_path / "b", backend))
    assert interrupted.fit(stop_at=3) is None          # "crash" after step 3 (checkpoint written)
    resumed = Trainer(cfg(wflw, tmp_path / "b", backend))
    assert resumed.step == 3
    resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in full.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k


def test_corrupt_checkpoint_is_reported(wflw, tmp_path):
    out = tmp_path / "c"
    Trainer(cfg(wflw, out)).fit(stop_at=1)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        Trainer(cfg(wflw, out))
    assert not any(p.name.startswith(".last.pt.tmp") for p in out.iterdir())


def test_solve_summary_reads_fractions():
    def stats(conv, div):
        n = len(conv)
        return SolverStats(method="anderson", max_iter=5, nstep=torch.tensor([2, 3, 4, 5][:n]),
                           best_residual=torch.zeros(n), abs_residual=torch.zeros(n), rel_residual=torch.zeros(n),
                           trace=torch.zeros(1, n), converged=torch.tensor(conv), diverged=torch.tensor(div))

    assert solve_summary(stats([True, False, True, True], [False, True, False, False]), "bwd") == {
        "bwd_iters": 3.5, "bwd_converged": 0.75, "bwd_diverged": 0.25}
    assert solve_summary(None, "fwd") == {"fwd_iters": None, "fwd_converged": None, "fwd_diverged": None}


def _state(trainer):
    """Everything a step may change, copied."""
    opt = trainer.opt.state_dict()
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.ema.state_dict().items()},
            {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for i, st in opt["state"].items()})


def _assert_same(a, b):
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            if isinstance(da[k], dict):
                _assert_same((da[k],), (db[k],))
            else:
                assert torch.equal(torch.as_tensor(da[k]), torch.as_tensor(db[k])), k


@pytest.mark.parametrize("poison", ["gradient", "loss"])
def test_a_non_finite_step_is_skipped_counted_and_never_applied(wflw, tmp_path, monkeypatch, poison):
    import ldeq_fast.train.loop as train_mod  # the loop's own reference to the loss

    trainer = Trainer(cfg(wflw, tmp_path / "nan"))
    bad_steps = {2}    # 1-based: the second step
    if poison == "gradient":
        w = trainer.model.deq_layer.cell.tail.conv.weight
        w.register_hook(lambda g: g * float("nan") if trainer.step + 1 in bad_steps else g)
    else:
        real = train_mod.landmark_loss
        monkeypatch.setattr(train_mod, "landmark_loss", lambda out, kpts, c: real(out, kpts, c) * (
            float("inf") if trainer.step + 1 in bad_steps else 1.0))
    trainer.fit(stop_at=1)
    before, lr_before = _state(trainer), trainer.sched.last_epoch
    trainer.fit(stop_at=2)
    _assert_same(before, _state(trainer))       # model (parameters and BatchNorm buffers), EMA, AdamW state
    assert trainer.step == 2 and trainer.skipped_steps == 1 and trainer.sched.last_epoch == lr_before + 1
    skip = rows_of(tmp_path / "nan", "skip")
    assert [(r["step"], r["skipped_steps"]) for r in skip] == [(2, 1)]
    assert skip[0]["reason"] == {"gradient": "non-finite gradients", "loss": "non-finite loss"}[poison]
    assert (skip[0]["loss"] is None) == (poison == "loss") and (skip[0]["grad_norm"] is None) == (poison == "gradient")
    trainer.fit()
    rows = rows_of(tmp_path / "nan", "train")
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in rows] == [
        (1, False, 0), (2, True, 1), (3, False, 1), (4, False, 1)]
    assert all(p.isfinite().all() for p in trainer.model.parameters())
    resumed = Trainer(cfg(wflw, tmp_path / "nan"))     # the count is part of the checkpoint
    assert resumed.skipped_steps == 1


def test_a_step_whose_backward_solve_diverged_is_skipped(wflw, tmp_path):
    """A backward (IFT) solve that diverges freezes at its start (zeros): every number stays finite, but the
    gradient is not the implicit one, so the step is skipped.  The divergence is made real by a NaN in the
    first vector-Jacobian product of the solve (a hook on the cell's tracked output)."""
    trainer = Trainer(cfg(wflw, tmp_path / "bwd", steps=2))

    def nan_in_the_first_vjp(module, inputs, output):
        if output.requires_grad:   # the tracked step, whose graph the backward solve differentiates
            calls = []
            output.register_hook(lambda g: (calls.append(1), g * float("nan") if len(calls) == 1 else g)[1])

    trainer.model.deq_layer.cell.register_forward_hook(nan_in_the_first_vjp)
    before = _state(trainer)
    trainer.fit(stop_at=1)
    (row,) = rows_of(tmp_path / "bwd", "train")
    assert row["skipped"] and row["skip_reason"] == "backward solve diverged" and row["bwd_diverged"] == 1.0
    assert row["loss"] is not None and row["grad_norm"] is not None          # finite, and still not applied
    _assert_same(before, _state(trainer))


def test_persistent_non_finite_steps_stop_training(wflw, tmp_path):
    trainer = Trainer(cfg(wflw, tmp_path / "stuck", max_consecutive_skips=2, steps=6))
    trainer.model.deq_layer.cell.tail.conv.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match=r"^training stopped at step 3: steps 1\.\.3 \(3 in a row, more than "
                                                 r"max_consecutive_skips=2\) were skipped, the last for: non-finite gradients; "):
        trainer.fit()
    assert trainer.skipped_steps == 3


def test_a_resume_with_other_run_settings_is_refused(wflw, tmp_path):
    out = tmp_path / "r"
    Trainer(cfg(wflw, out)).fit(stop_at=1)
    with pytest.raises(CheckpointError, match=r"cannot resume: these settings differ from the checkpoint's, so the "
                                              r"resumed run would not continue the same run: batch_size: checkpoint 2, "
                                              r"now 3; lr: checkpoint 0\.001, now 0\.002; seed: checkpoint 0, now 1; "
                                              r"steps: checkpoint 4, now 6; warmup_steps: checkpoint 2, now 3\. "):
        Trainer(cfg(wflw, out, lr=2e-3, steps=6, seed=1, batch_size=3, warmup_steps=3))
    with pytest.raises(CheckpointError, match=r"different model configuration \(max_iters: checkpoint 2, now 3\)"):
        Trainer(cfg(wflw, out, model={"max_iters": 3, "backend": "torch", "injection_width": 16,
                                      "cell_base_width": 16, "cell_width_increment": 4}))
    again = Trainer(cfg(wflw, out, eval_every=7, log_every=2, progress=False))   # reporting may change
    assert again.step == 1


def test_config_errors(wflw, tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*'lerning_rate'"):
        TrainConfig.from_dict({"lerning_rate": 1})
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_dict({"model": {"not_a_model_key": 1}})
    with pytest.raises(ValueError, match="needs data_root"):
        TrainConfig.from_dict({"data": "wflw_cropped"})
    assert parse_overrides(["steps=5", "model.max_iters=3", "out_dir=x"]) == {
        "steps": 5, "model": {"max_iters": 3}, "out_dir": "x"}
    with pytest.raises(FileNotFoundError, match="train.txt"):
        Trainer(cfg(tmp_path / "nowhere", tmp_path / "d"))


def test_ddp_two_processes_end_with_identical_weights(wflw, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    c = cfg(wflw, out, steps=2, ema_decay=0.0, save_rank_weights=True)
    (tmp_path / "c.json").write_text(json.dumps(c.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", "29517", "-m", "ldeq_fast.cli",
                           "train", "--config", str(tmp_path / "c.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(out / "rank0_weights.pt", weights_only=True)
    w1 = torch.load(out / "rank1_weights.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    init = Trainer(cfg(wflw, tmp_path / "fresh", steps=2, ema_decay=0.0, resume=False)).model.state_dict()
    assert any(not torch.equal(w0[k], init[k]) for k in w0)   # and they did train
