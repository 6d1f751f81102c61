"""bench/gpu_suite.sh end to end on the CPU (LDEQ_SUITE_SMOKE=1: toy sizes, no build step).

GPU time is scarce and the suite runs there in one go, so every step's script, its JSON and the summary
that reads the JSON are exercised here first; only the CUDA-specific branches are left for the GPU.
"""
import json
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_suite(out_dir, timeout: int, **env) -> subprocess.CompletedProcess:
    """bench/gpu_suite.sh in smoke mode on the CPU, results under ``out_dir``; ``env`` adds variables."""
    env = dict(os.environ, LDEQ_SUITE_SMOKE="1", OUT=str(out_dir), CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh")], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _step(out_dir, name: str) -> dict:
    return json.loads((out_dir / f"step_{name}.json").read_text())


def test_gpu_suite_smoke_run_on_cpu(tmp_path):
    proc = _run_suite(tmp_path, 900)
    out = proc.stdout + proc.stderr
    steps = sorted(p.name[len("step_"):-len(".json")] for p in tmp_path.glob("step_*.json"))
    assert steps == sorted(["gpu_tests", "solver_bench", "model_bench", "model_gpu", "cellops", "profile",
                            "train_bench", "torchdeq_adapter"]), out[-4000:]
    failed = {s: _step(tmp_path, s)["log_tail"][-1500:] for s in steps if not _step(tmp_path, s)["ok"]}
    assert not failed, failed
    assert proc.returncode == 0, out[-4000:]
    # the summary read every result file
    for line in ("gpu tests: {", "solver on", "model fast_bf16", "streaming batch 1 (eager)", "train batch 2:",
                 "1.00x compiled", "bf16 vs fp32 keypoints", "fast: convolutions"):
        assert line in proc.stdout, proc.stdout[-4000:]
    gpu = json.loads((tmp_path / "model_gpu.json").read_text())
    assert {r["path"] for r in gpu["rows"]} >= {"published_eager", "fast_fp32", "fast_bf16"}
    assert {r["path"] for r in gpu["compiled"]["rows"]} >= {"reference_compiled_max_autotune", "fast_bf16"}


def test_gpu_suite_exit_status_counts_failed_steps(tmp_path):
    # a step that does not exist fails like any other (exit 127): recorded, summarised, exit status 1
    proc = _run_suite(tmp_path, 120, LDEQ_GPU_STEPS="no_such_step")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _step(tmp_path, "no_such_step")["exit_code"] == 127
    assert "no_such_step     FAILED (exit 127)" in proc.stdout


def test_gpu_suite_step_timeout(tmp_path):
    # LDEQ_STEP_TIMEOUT bounds each step: the slow one is stopped (exit 124) and the next one still runs
    proc = _run_suite(tmp_path, 300, LDEQ_GPU_STEPS="train_bench solver_bench", LDEQ_STEP_TIMEOUT="2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _step(tmp_path, "train_bench")["exit_code"] == 124
    assert "TIMED OUT" in proc.stdout
    assert (tmp_path / "step_solver_bench.json").exists()
