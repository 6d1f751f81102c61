"""The bench's peers (ldeq_fast/peers.py in ldeq_fast/benchmark.py): each peer row agrees with the reference
running the same computation, records what ran and the peer's version; a missing peer is skipped and said so;
the path order really rotates between repeats."""
import sys

import pytest
import torch
from conftest import needs_cpp, tiny_config

from ldeq_fast import LDEQ, peers
from ldeq_fast.benchmark import FPI, SOLVER, default_paths, format_table, path_order, run_bench

# float32 rounding: the runtimes' convolutions sum in another order than PyTorch's, ~1e-6 relative per op;
# a contractive map does not amplify it over 2 iterations.  1e-3 heatmap px is 100x above that (a 16 px
# coordinate rounds at ~2e-6 px) and 1000x below a pixel, so a wrong graph, iteration count or start fails.
TOL_PX = 1e-3


def contractive_state(cfg, seed=0):
    """Random weights with the cell's dependence on z damped (as a trained model: residuals fall at every
    iteration, so the solver's best iterate is its last, the unrolled graph's answer)."""
    torch.manual_seed(seed)
    model = LDEQ(cfg)
    with torch.no_grad():
        model.deq_layer.cell.tail.conv.weight[:, : cfg.z_width] *= 0.2
    return model.state_dict()


def bench(paths, iters=2, batches=(1, 2), repeats=2):
    cfg = tiny_config(max_iters=iters)
    return run_bench(batch_sizes=batches, repeats=repeats, paths=paths, progress=False, config=cfg,
                     state_dict=contractive_state(cfg))


def test_path_order_rotates():
    names = ["a", "b", "c"]
    orders = [path_order(names, r) for r in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert path_order([], 3) == []


@needs_cpp
@pytest.mark.parametrize("peer", peers.ONNX_PEERS)
def test_onnx_peer_rows_agree_and_record_what_ran(peer):
    pytest.importorskip(peer, reason=f"{peer} is not installed (pip install 'ldeq_fast[peers]')")
    res = bench(["reference", "fast", peer])
    rows = {(r["path"], r["group"], r["batch"]): r for r in res["rows"]}
    assert res["onnx_export"]["iterations"] == "2" and res["onnx_export"]["extra_step"] == "1"
    assert res["peers"][peer]["version"] == peers.peer_version(peer) and res["peers"][peer]["threads"] >= 1
    for bs in (1, 2):
        assert res["fpi_reference"][str(bs)]["best_is_last"]        # so the solver's answer is the graph's
        assert set(res["fpi_reference"][str(bs)]["backends"].values()) == {"torch"}
        p, f = rows[(peer, FPI, bs)], rows[("fast", FPI, bs)]
        assert p["version"] == peers.peer_version(peer) and p["backends"] == {"graph": f"{peer} {p['version']}"}
        assert p["max_kpt_diff_px"] < TOL_PX and f["max_kpt_diff_px"] < TOL_PX, (p, f)
        assert p["baseline"] == peer and p["speedup_vs_baseline"] == pytest.approx(1.0)  # the only peer: the best
        assert f["baseline"] == peer and f["speedup_vs_baseline"] > 0 and f["iterations"] == 2.0
        assert set(f["backends"].values()) == {"cpp"}
        assert p["setting"] == f["setting"] == res["fpi_group"]["setting"]
        # the own-solver group is compared with the reference when published did not run
        assert rows[("fast", SOLVER, bs)]["baseline"] == "reference"
    assert res["fast_path_problems"] == []
    text = format_table(res)
    assert f"fast vs best peer {peer}" in text and res["peers"][peer]["version"] in text


def test_wrong_iteration_count_would_fail_the_tolerance(tmp_path):
    """The tolerance is tight enough to see one iteration more or less (the test above can fail)."""
    pytest.importorskip("onnxruntime")
    from ldeq_fast.deq import SolverSettings

    cfg = tiny_config(max_iters=2, backend="torch")
    model = LDEQ(cfg).eval()
    model.load_state_dict(contractive_state(cfg))
    peers.export_for_peers(model, tmp_path / "m.onnx", 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x, solver=SolverSettings(method="fpi", max_iter=2, tol=0.0, backend="torch")).keypoints
    diff = (peers.OnnxPeer("onnxruntime", tmp_path / "m.onnx")(x) - ref).abs().max() * cfg.heatmap_size
    assert diff > TOL_PX


def test_missing_peer_is_skipped_and_said(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)       # import openvino now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "not installed" in peers.missing_reason("openvino")
    assert default_paths() == ("reference", "fast", "published")
    res = bench(["reference", "openvino"], iters=1, batches=(1,), repeats=1)
    assert [s["path"] for s in res["skipped"]] == ["openvino"] and "not installed" in res["skipped"][0]["why"]
    assert {r["path"] for r in res["rows"]} == {"reference"} and "onnx_export" not in res
    assert "(skipped openvino: openvino is not installed" in format_table(res)
    with pytest.raises(ImportError, match="not installed"):
        peers.OnnxPeer("openvino", "unused.onnx")
    # the default run says which peers it could not run
    res = run_bench(batch_sizes=(1,), repeats=1, progress=False, config=tiny_config(max_iters=1),
                    paths=None)
    assert {s["path"] for s in res["skipped"]} >= {"openvino", "onnxruntime"}
    assert {r["path"] for r in res["rows"]} <= {"reference", "fast", "published"}


def test_order_really_alternates():
    """The recorded order is the order the calls ran in (logged by the loop itself), and it changes."""
    res = bench(["reference", "published"], iters=1, batches=(1,), repeats=2)
    order = res["call_order"]["1"]
    assert order == [["reference@solver", "published@solver"], ["published@solver", "reference@solver"],
                     ["reference@solver", "published@solver"]]
    assert all(len(r["times_s"]) == 2 for r in res["rows"])


@pytest.mark.slow
def test_compile_row():
    """torch.compile of the reference: the same keypoints, first-call time recorded (compiles for a minute)."""
    res = bench(["reference", "compile"], iters=2, batches=(1,), repeats=1)
    row = next(r for r in res["rows"] if r["path"] == "compile")
    assert row["max_kpt_diff_px"] < TOL_PX and row["first_call_s"] > 0
    assert row["version"] == torch.__version__ and row["backends"]["graph"].startswith("torch.compile")
    assert row["baseline"] == "reference"


@needs_cpp
def test_time_to_accuracy_with_peers(tmp_path, monkeypatch):
    """Equal accuracy: each path at its cheapest setting that its own run verifies; the ONNX peer runs from
    the learned initial state (in the export) and agrees with the fpi curve; a missing peer is skipped."""
    pytest.importorskip("onnxruntime")
    from ldeq_fast.accuracy import (
        format_time_to_accuracy,
        plot_accuracy,
        recommend,
        run_accuracy,
        time_to_accuracy,
    )
    from ldeq_fast.model.init_state import new_initial_state

    cfg = tiny_config(max_iters=3, n_keypoints=98)   # an NME layout (inter-ocular indices)
    model = LDEQ(cfg).eval()
    model.load_state_dict(contractive_state(cfg))
    torch.manual_seed(3)
    model.set_initial_state(new_initial_state(model))
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.rand(6, 98, 2, generator=torch.Generator().manual_seed(2))
    res = run_accuracy(model, x, labels, evals=(2, 3, 4), converged_iters=8, progress=False)
    res["recommendation"] = recommend(res, 50.0)
    monkeypatch.setitem(sys.modules, "openvino", None)
    ta = time_to_accuracy(model, x, labels, res, 50.0, paths=("fast", "onnxruntime", "openvino"), batches=(1, 2),
                          repeats=1, progress=False)
    res["time_to_accuracy"] = ta
    assert [s["path"] for s in ta["skipped"]] == ["openvino"] and "not installed" in ta["skipped"][0]["why"]
    assert ta["paths"]["fast"]["reached"] and ta["paths"]["onnxruntime"]["reached"]
    peer = next(c for c in ta["candidates"] if c["path"] == "onnxruntime" and c["within"])
    assert peer["z0"] == "learned" and peer["method"] == "fpi" and peer["ran"]["export"]["z0"] == "learned initial state"
    assert peer["ran"]["version"] == peers.peer_version("onnxruntime")
    assert int(peer["ran"]["export"]["iterations"]) == peer["evals"] - 1
    curve = next(c for c in res["curves"] if c["method"] == "fpi" and c["z0"] == "learned")
    point = next(p for p in curve["points"] if p["evals"] == peer["evals"])
    assert peer["nme"] == pytest.approx(point["nme"], abs=1e-6)   # the same computation (residuals fall)
    assert all(ta["paths"][p]["best"][b]["ms_per_image"] > 0 for p in ("fast", "onnxruntime") for b in ("1", "2"))
    assert set(ta["fast_speedup"]["2"]) == {"onnxruntime"}
    text = format_time_to_accuracy(ta)
    assert "skipped openvino" in text and "onnxruntime" in text
    plot_accuracy(res, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000
