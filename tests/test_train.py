import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch

from ldeq_fast.model.weights import load_weights
from ldeq_fast.train import TrainConfig, Trainer, parse_overrides


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


def cfg(root, out, **kw):
    base = dict(out_dir=str(out), data="wflw_cropped", data_root=str(root), model_preset="small",
                model={"max_iters": 2, "backend": "torch", "injection_width": 16, "cell_base_width": 16,
                       "cell_width_increment": 4},
                steps=4, batch_size=2, warmup_steps=2, eval_every=100, ckpt_every=100, log_every=1,
                progress=False, augment=True, ema_decay=0.5)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_train_outputs_and_exact_resume(wflw, tmp_path):
    full = Trainer(cfg(wflw, tmp_path / "a"))
    res = full.fit()
    assert set(res) == {"test"} and 0 < res["test"]["nme"] < 10
    out = tmp_path / "a"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(r["bwd_iters"] is not None for r in rows if r["kind"] == "train")
    assert (out / "curves.png").stat().st_size > 0
    exported = load_weights(out / "model.pt")
    assert exported.cfg == full.model.cfg

    interrupted = Trainer(cfg(wflw, tmp_path / "b"))
    assert interrupted.fit(stop_at=3) is None          # "crash" after step 3 (checkpoint written)
    resumed = Trainer(cfg(wflw, tmp_path / "b"))
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
