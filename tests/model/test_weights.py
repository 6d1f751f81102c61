"""ldeq_fast's weights format: model.pt + model.json written and read as one pair."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO

import ldeq_fast.model.weights as weights_mod
from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.model import load_weights, save_weights
from ldeq_fast.model.checkpoint import CheckpointError

DEMO = REPO / "ldeq_fast" / "assets" / "demo_synthetic.pt"


def small(seed=0, **kw):
    torch.manual_seed(seed)
    return LDEQ(LDEQConfig.small(backend="torch", injection_width=16, cell_base_width=16, cell_width_increment=4,
                                 **kw))


def same_weights(a, b):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_round_trip_and_the_pair_record(tmp_path):
    model = small(max_iters=3)
    pt, js = save_weights(model, tmp_path)
    doc = json.loads(js.read_text())
    assert doc["format"] == "ldeq_fast.weights/2" and doc["config"] == model.cfg.to_dict()
    assert len(doc["weights_blake2b"]) == 128
    again = load_weights(pt)
    assert again.cfg == model.cfg and same_weights(model, again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]   # no temporary left


def test_the_shipped_flat_config_still_loads():
    model = load_weights(DEMO)
    assert model.cfg.heatmap_size == 32 and "format" not in json.loads(DEMO.with_suffix(".json").read_text())


def _crash_on_rename_of(target_name, monkeypatch):
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == target_name:
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(weights_mod.os, "replace", replace)


def test_a_crash_before_the_weights_rename_keeps_a_usable_pair(tmp_path, monkeypatch):
    old, new = small(0, max_iters=2), small(1, max_iters=5)
    pt, _ = save_weights(old, tmp_path)
    _crash_on_rename_of("model.pt", monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        save_weights(new, tmp_path)            # the JSON now names the new weights, still pending
    monkeypatch.undo()
    assert (tmp_path / ".model.pt.pending").is_file()
    with pytest.warns(UserWarning, match="finished an interrupted save_weights"):
        loaded = load_weights(pt)              # finishes the rename: the new pair, never old weights + new config
    assert loaded.cfg.max_iters == 5 and same_weights(new, loaded)
    assert not (tmp_path / ".model.pt.pending").exists()
    assert same_weights(new, load_weights(pt))


def test_a_crash_before_the_config_rename_keeps_the_old_pair(tmp_path, monkeypatch):
    old, new = small(0, max_iters=2), small(1, max_iters=5)
    pt, _ = save_weights(old, tmp_path)
    monkeypatch.setattr(weights_mod, "atomic_write", lambda path, write: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        save_weights(new, tmp_path)
    monkeypatch.undo()
    loaded = load_weights(pt)
    assert loaded.cfg.max_iters == 2 and same_weights(old, loaded)


def test_a_mismatched_pair_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_weights(small(0), a)
    save_weights(small(1), b)
    (a / "model.pt").write_bytes((b / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(
            f"{a / 'model.pt'} does not belong to {a / 'model.json'}: the config was written for other weights "
            "(digest mismatch); save the model again with save_weights")):
        load_weights(a / "model.pt")


def test_missing_or_bad_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"weights not found: {tmp_path / 'x.pt'}")):
        load_weights(tmp_path / "x.pt")
    torch.save({}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"config not found beside the weights: {tmp_path / 'x.json'}")):
        load_weights(tmp_path / "x.pt")
    (tmp_path / "x.json").write_text('{"format": "ldeq_fast.weights/9", "config": {}}')
    with pytest.raises(CheckpointError, match="unknown weights config format 'ldeq_fast.weights/9'"):
        load_weights(tmp_path / "x.pt")
    (tmp_path / "x.json").write_text('{"rel_tol": "5e-3"}')
    with pytest.raises(CheckpointError, match=re.escape("LDEQConfig: rel_tol must be a float, got str '5e-3'")):
        load_weights(tmp_path / "x.pt")
