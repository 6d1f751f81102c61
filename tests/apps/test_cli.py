import copy
import json
import subprocess
import sys

import pytest
import torch

from ldeq_fast import LDEQ, LDEQConfig


def _reference_rounding_px() -> dict:
    """Per batch of the bench run below: max |reference fp32 - reference fp64| keypoint error in heatmap px, on
    the images run_bench draws (torch.manual_seed(0); the base model; the reference and fast models; then each
    batch's images)."""
    torch.manual_seed(0)
    cfg = LDEQConfig.small(max_iters=2)
    base = LDEQ(cfg.replace(backend="torch")).eval()
    for _ in ("reference", "fast"):
        LDEQ(cfg)
    exact = copy.deepcopy(base).double()   # no draw from the generator: the images below stay run_bench's
    out = {}
    with torch.no_grad():
        for bs in (1, 2):
            x = torch.randn(bs, 3, cfg.im_size, cfg.im_size)
            k32 = base(x).keypoints.double()
            out[bs] = float((k32 - exact(x.double()).keypoints).abs().max()) * cfg.heatmap_size
    return out


def test_bench_small_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "bench", "--small", "--batch", "1,2", "--repeats", "1",
                           "--max-iters", "2", "--paths", "reference,fast", "--no-progress", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"] and "isa_flags" in res["machine"]
    assert {"load_average_before", "load_average_after"} <= set(res["machine"])   # around the measurement
    paths = {r["path"] for r in res["rows"]}
    assert paths == {"reference", "fast"}       # as asked (--paths)
    rows = {(r["path"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(p, b) for p in ("reference", "fast") for b in (1, 2)}
    for (path, bs), r in rows.items():
        assert len(r["times_s"]) == 1 and r["images_per_s"] == pytest.approx(bs / r["times_s"][0])
        assert 1 <= r["iterations"] <= 2          # --max-iters 2 reached the solver
        assert set(r["backends"].values()) == ({"torch"} if path == "reference" else {"cpp"}), r
    # the fast rows' keypoints against the reference's: within 2x the reference's own fp32 rounding on the same
    # weights and images (run_bench: seed 0, the base model, one model per path, then each batch's images)
    bound = _reference_rounding_px()
    for bs in (1, 2):
        assert rows[("reference", bs)]["max_kpt_diff_px"] == 0.0
        assert rows[("fast", bs)]["max_kpt_diff_px"] <= 2 * bound[bs] + 1e-5, (rows[("fast", bs)], bound)
    assert res["fast_path_problems"] == [] and "fast path ran: " in proc.stdout


def test_bench_defaults_show_the_published_path_and_a_peer(tmp_path):
    """A plain ``ldeq-fast bench``: reference, fast, the published path and the first installed ONNX peer (fast
    then also runs the peer's computation); every row names its baseline and says what ran."""
    from ldeq_fast.benchmark import default_paths

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "bench", "--small", "--batch", "1", "--repeats", "1",
                           "--max-iters", "2", "--no-progress", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    paths = {r["path"] for r in res["rows"]}
    assert paths == set(default_paths()) and {"reference", "fast", "published"} <= paths
    for r in res["rows"]:
        assert r["baseline"] in ("published", *paths) and r["backends"], r
        if r["path"] == "reference":
            assert r["max_kpt_diff_px"] == 0.0 and set(r["backends"].values()) == {"torch"}
    fast = [r for r in res["rows"] if r["path"] == "fast"]
    assert len(fast) == 1 + (len(paths) > 3) and all(set(r["backends"].values()) == {"cpp"} for r in fast), fast
    assert "fast vs published" in proc.stdout
    assert res["fast_path_problems"] == [] and "fast path ran: " in proc.stdout


def test_unknown_path_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "bench", "--small", "--paths", "warp9"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown path" in proc.stderr
