"""bench/gpu_suite.sh on the CPU (LDEQ_SUITE_SMOKE=1: toy sizes): both commands' step lists, their bundles, the
summary, the budgets, and a step stopped part way.

GPU time is scarce (15 minutes, two commands of <= 7 minutes) and the suite runs there in one go, so every
step's script, its JSON and the summary that reads it are exercised here first; only the CUDA branches are
left for the GPU.
"""
import json
import os
import re
import subprocess
import sys
import tarfile

from conftest import REPO

from ldeq_fast.numerics import native_bf16

ROOT = REPO
SUITE = ROOT / "bench" / "gpu_suite.sh"
LIMIT_S = 420                     # one command on the GPU machine: <= 7 minutes
FILES_BACK = 8                    # the GPU machine returns at most 8 files from $OUT
NATIVE_BF16 = native_bf16("cpu")   # the smoke runs time bf16 rows only where bf16 is native


def _run_suite(out_dir, *args, timeout: int = 1500, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, LDEQ_SUITE_SMOKE="1", OUT=str(out_dir), CUDA_VISIBLE_DEVICES="",
               LDEQ_FAST_TEST_THREADS="1", **env)
    return subprocess.run(["bash", str(SUITE), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _bundle(out_dir, command: int) -> dict:
    return json.loads((out_dir / f"suite{command}.json").read_text())


def _plan() -> dict:
    out = subprocess.run(["bash", str(SUITE), "--plan"], capture_output=True, text=True, check=True).stdout
    plan, cmd = {}, None
    for line in out.splitlines():
        if m := re.match(r"command (\d): (\d+) s of budgets", line):
            cmd = int(m.group(1))
            plan[cmd] = {"total": int(m.group(2)), "steps": {}}
        elif m := re.match(r"\s+(\w+)\s+(\d+) s\s+\S", line):
            plan[cmd]["steps"][m.group(1)] = int(m.group(2))
    return plan


def _check_outputs_fit(out_dir) -> None:
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert len(files) <= FILES_BACK, f"{len(files)} files in OUT: the GPU machine returns {FILES_BACK}"


def test_plan_lists_both_commands_within_the_limit():
    plan = _plan()
    assert set(plan) == {1, 2}
    text = SUITE.read_text()
    for cmd, p in plan.items():
        assert sum(p["steps"].values()) == p["total"] <= LIMIT_S - 15, p  # room for the bundling between steps
        for name in p["steps"]:
            assert f"step_{name}()" in text, f"command {cmd} lists {name} but the script has no step_{name}"
    assert list(plan[1]["steps"])[-1] == "gpu_tests", "the GPU tests run last in command 1"
    assert "compile_cell" in plan[2]["steps"] and "torchdeq_adapter" in plan[2]["steps"]


def _check_command(out_dir, cmd: int, proc) -> dict:
    out = proc.stdout + proc.stderr
    bundle = _bundle(out_dir, cmd)
    assert list(bundle["steps"]) == list(_plan()[cmd]["steps"]), out[-3000:]
    failed = {s: st["log_tail"][-1500:] for s, st in bundle["steps"].items() if not st["ok"]}
    assert not failed, failed
    assert proc.returncode == 0, out[-3000:]
    with tarfile.open(out_dir / f"suite{cmd}_logs.tar.gz") as tar:
        names = tar.getnames()
    assert all(any(n.endswith(f"{s}.log") for n in names) for s in bundle["steps"]), names
    _check_outputs_fit(out_dir)
    return bundle


def test_command_1_smoke_run_on_cpu(tmp_path):
    proc = _run_suite(tmp_path, "1")
    bundle = _check_command(tmp_path, 1, proc)
    steps = bundle["steps"]
    assert steps["env"]["result"]["cuda_extension"].startswith("none")
    assert steps["env"]["result"]["kernels"].startswith(str(ROOT / "kernels"))
    gpu = steps["model_gpu"]["result"]
    bf16 = {"published_eager_bf16", "fast_bf16"}
    if NATIVE_BF16:
        assert {r["path"] for r in gpu["rows"]} >= {"published_eager", "fast_fp32"} | bf16
    else:   # a CPU without native bf16: the bf16 rows are skipped, and said so
        assert {r["path"] for r in gpu["rows"]} >= {"published_eager", "fast_fp32"}
        assert {s["path"] for s in gpu["skipped"]} == bf16 and not bf16 & {r["path"] for r in gpu["rows"]}
        assert "no native bf16" in steps["bf16_agreement"]["result"]["skipped"]
    assert gpu["streaming_batch1"]["eager"]["input_check"].startswith("off")
    assert steps["kernels"]["result"]["passed"] >= 2
    assert steps["gpu_tests"]["result"]["tests"] > 0
    assert steps["profile"]["result"]["paths"]["fast"]["time_rows"] == "operator self CPU time"
    bf16_lines = ("model fast_bf16", "bf16 vs fp32 keypoints") if NATIVE_BF16 else (
        "model fast_bf16: skipped", "bf16 vs fp32 keypoints: skipped")
    for line in (*bf16_lines, "streaming batch 1 (eager)", "solver kernels (wall clock",
                 "train batch 2:", "profile fast: convolutions", "gpu tests:", "env: no GPU"):
        assert line in proc.stdout, proc.stdout[-4000:]


def test_command_2_smoke_run_on_cpu(tmp_path):
    proc = _run_suite(tmp_path, "2")
    bundle = _check_command(tmp_path, 2, proc)
    steps = bundle["steps"]
    for name, target in (("compile_cell", "cell"), ("compile_model", "model")):
        c = steps[name]["result"]["compiled"]
        assert c["status"] == "ok" and c["target"] == target and c["compile_s"]["fp32"] > 0, c
        assert {r["path"] for r in c["rows"]} >= {"published_eager", "reference_compiled_fp32",
                                                  *(["fast_bf16"] if NATIVE_BF16 else [])}
    assert steps["torchdeq_adapter"]["ok"]
    assert "1.00x compiled reference" in proc.stdout, proc.stdout[-4000:]


def _python_that_blocks(folder, condition: str) -> str:
    """An interpreter for the suite's PYTHON that, for the calls matching the bash test ``condition``, runs a
    Python that sleeps an hour (so the step cannot finish inside its budget however fast the machine is, and a
    SIGINT ends it with a KeyboardInterrupt), and otherwise the real one (the suite's own suite_report.py)."""
    wrapper = folder / "python_that_blocks"
    wrapper.write_text(f'#!/bin/bash\nif {condition}; then exec "{sys.executable}" -c "import time; time.sleep(3600)"; '
                       f'fi\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_step_stopped_part_way_leaves_the_others(tmp_path):
    # train is stopped 10 s in (SIGINT, as at its budget on the GPU); the steps before and after it still run
    # and their results are in the bundle, and the command fails
    python = _python_that_blocks(tmp_path, '[[ "$1" == */bench_train.py ]]')
    out = tmp_path / "out"
    proc = _run_suite(out, "1", LDEQ_GPU_STEPS="env train profile", LDEQ_STEP_TIMEOUT_train="10", PYTHON=python,
                      timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = _bundle(out, 1)["steps"]
    assert list(steps) == ["env", "train", "profile"]
    train = steps["train"]
    assert train["exit_code"] == 124 and train["stopped_at_budget"] and "KeyboardInterrupt" in train["log_tail"]
    assert steps["env"]["ok"] and steps["env"]["result"]["kernels"]
    assert steps["profile"]["ok"] and steps["profile"]["result"]["paths"]["fast"]["conv_share"] > 0
    assert "STOPPED at budget" in proc.stdout
    _check_outputs_fit(out)


def test_unknown_step_fails_like_a_step(tmp_path):
    proc = _run_suite(tmp_path, "2", LDEQ_GPU_STEPS="no_such_step", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _bundle(tmp_path, 2)["steps"]["no_such_step"]["exit_code"] == 127
    assert "no_such_step      FAILED (exit 127)" in proc.stdout


def test_no_step_runs_past_the_command_deadline(tmp_path):
    # a 14 s command: env gets what is left of it (~4 s) and is stopped; profile, with nothing left, is recorded
    # as not started.  The env step (its script on stdin, `-`) cannot finish inside its budget on any machine.
    python = _python_that_blocks(tmp_path, '[ "$1" = - ]')
    out = tmp_path / "out"
    proc = _run_suite(out, "1", LDEQ_GPU_STEPS="env profile", LDEQ_COMMAND_BUDGET="14", PYTHON=python,
                      timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = _bundle(out, 1)["steps"]
    assert steps["env"]["budget_s"] <= 4 and steps["env"]["exit_code"] == 124, steps["env"]
    assert steps["profile"]["exit_code"] == 125 and steps["profile"]["seconds"] == 0
    assert "NOT STARTED (no time)" in proc.stdout
