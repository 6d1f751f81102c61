import json
import subprocess
import sys


def test_bench_small_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "bench", "--small", "--batch", "1,2", "--repeats", "1",
                           "--max-iters", "2", "--no-progress", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"]
    from ldeq_fast.benchmark import default_paths

    paths = {r["path"] for r in res["rows"]}
    # the defaults: reference, fast, published and the first installed ONNX peer (with fast at its computation)
    assert paths == set(default_paths()) and {"reference", "fast", "published"} <= paths
    for r in res["rows"]:
        assert r["images_per_s"] > 0 and r["baseline"] in ("published", *paths)
        if r["path"] == "reference":
            assert r["max_kpt_diff_px"] == 0.0 and set(r["backends"].values()) == {"torch"}
    fast = [r for r in res["rows"] if r["path"] == "fast"]
    assert len(fast) == 2 * (1 + (len(paths) > 3)) and all(set(r["backends"].values()) == {"cpp"} for r in fast), fast
    assert "fast vs published" in proc.stdout
    assert res["fast_path_problems"] == [] and "fast path ran: " in proc.stdout


def test_unknown_path_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "ldeq_fast.cli", "bench", "--small", "--paths", "warp9"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown path" in proc.stderr
