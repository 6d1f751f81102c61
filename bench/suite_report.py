"""The GPU suite's bookkeeping (bench/gpu_suite.sh): one bundle JSON per command, rewritten after every step,
and the table of key figures printed at the end.  Standard library only (no torch import: fast).

    python bench/suite_report.py record BUNDLE WORK STEP EXIT_CODE SECONDS BUDGET COMMAND
    python bench/suite_report.py junit XML OUT_JSON PYTEST_EXIT_CODE
    python bench/suite_report.py summary BUNDLE
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

LOG_TAIL = 3000


def _write(path: str, payload: dict) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def record(bundle: str, work: str, step: str, rc: str, seconds: str, budget: str, command: str) -> None:
    data = json.load(open(bundle)) if os.path.exists(bundle) else {"command": int(command), "steps": {}}
    rc_i = int(rc)
    skipped = os.path.exists(os.path.join(work, f"{step}.skipped"))
    entry = {"ok": rc_i == 0, "exit_code": rc_i, "seconds": int(seconds), "budget_s": int(budget),
             "stopped_at_budget": rc_i == 124, "skipped": open(os.path.join(work, f"{step}.skipped")).read().strip()
             if skipped else None}
    log = os.path.join(work, f"{step}.log")
    entry["log_tail"] = open(log, errors="replace").read()[-LOG_TAIL:] if os.path.exists(log) else ""
    res = os.path.join(work, f"{step}.json")
    if os.path.exists(res):
        try:
            entry["result"] = json.load(open(res))
        except json.JSONDecodeError as exc:   # a step stopped while writing: say so, keep the rest
            entry["result"] = {"unreadable": str(exc)}
    data["steps"][step] = entry
    _write(bundle, data)


def junit(xml: str, out: str, rc: str) -> None:
    counts: dict = {"pytest_exit_code": int(rc)}
    if os.path.exists(xml):
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                  if c.find("failure") is not None or c.find("error") is not None][:50]
    else:
        counts["error"] = "pytest wrote no junit XML"
    _write(out, counts)


def _fmt_step(name: str, st: dict) -> str:
    if st.get("skipped"):
        state = "skipped"
    elif st["ok"]:
        state = "ok"
    elif st["stopped_at_budget"]:
        state = "STOPPED at budget"
    elif st["exit_code"] == 125:
        state = "NOT STARTED (no time)"
    else:
        state = f"FAILED (exit {st['exit_code']})"
    return f"  {name:<17} {state:<20} {st['seconds']:>4}s of {st['budget_s']}s"


def summary(bundle: str) -> int:
    if not os.path.exists(bundle):
        print(f"no results in {bundle}")
        return 1
    data = json.load(open(bundle))
    steps = data["steps"]
    print(f"\n==== GPU suite, command {data['command']} ({bundle})")
    for name, st in steps.items():
        print(_fmt_step(name, st))

    def result(name):
        return steps.get(name, {}).get("result") or {}

    r = result("env")
    if r:
        print(f"  env: {r.get('gpu') or 'no GPU'} | torch {r['torch']} | triton {r['triton']} | kernels from "
              f"{r['kernels']} | C++ extension loaded: {r['cpp_extension_loaded']} | backend: {r['backend_for_device']}")
    r = result("kernels")
    if r:
        print(f"  kernels compiled for sm_90 (compile-only harness): {r.get('passed', '?')} groups passed, "
              f"{r.get('failures', '?')} failed (pytest exit {r['pytest_exit_code']})")
    r = result("model_gpu")
    for row in r.get("rows", []):
        print(f"  model {row['path']:<24} {row['images_per_s']:8.1f} img/s  {row['speedup_vs_published_eager']:5.2f}x "
              f"published eager  dkpt {row['max_kpt_diff_px_vs_fast_fp32']:.3f} px")
    for name, s in r.get("streaming_batch1", {}).items():
        print(f"  streaming batch 1 ({name}): {s['ms_per_frame']:.3f} ms/frame, {s['cell_evals_per_frame']} cell evals")
    for skip in r.get("skipped", []):
        print(f"  model {skip['path']}: skipped ({skip['why']})")
    r = result("bf16_agreement")
    if r.get("skipped"):
        print(f"  bf16 vs fp32 keypoints: skipped ({r['skipped']})")
    elif r:
        d = r["bf16_vs_fp32_px"]
        print(f"  bf16 vs fp32 keypoints (demo model): mean {d['mean']:.4f}, p99 {d['p99']:.4f}, max {d['max']:.4f} px")
    r = result("solver_kernels")
    if r.get("kernels"):
        k = r["kernels"]
        print(f"  solver kernels ({k.get('timer', '')}): copy {k['copy']['GB_per_s']:.0f} GB/s | update "
              f"{k['update']['GB_per_s']:.0f} GB/s ({k['update']['fraction_of_copy']:.0%}) | mix "
              f"{k['mix']['GB_per_s']:.0f} GB/s ({k['mix']['fraction_of_copy']:.0%})")
        for name, v in r["per_iteration"].items():
            print(f"    {name:<10} {v['ms_per_iter']:8.3f} ms/iter  overhead {v['overhead_ms_per_iter']:8.3f} ms/iter")
    r = result("train")
    for row in r.get("rows", []):
        if "time_ratio_vs_published" in row:
            print(f"  train batch {row['batch']}: {1e3 * row['s_per_sample']:.1f} ms/sample, "
                  f"{row['peak_mb_per_sample']:.0f} MB/sample; {row['time_ratio_vs_published']:.2f}x time, "
                  f"{row['memory_ratio_vs_published']:.2f}x memory of the published-semantics step")
    r = result("profile")
    for name, p in r.get("paths", {}).items():
        print(f"  profile {name}: convolutions {p['conv_share']:.1%} of {p['total_ms']:.1f} ms ({p['time_rows']})")
    r = result("gpu_tests")
    if r:
        print(f"  gpu tests: {r.get('passed', '?')} passed, {r.get('failures', '?')} failed, {r.get('errors', '?')} "
              f"errors, {r.get('skipped', '?')} skipped (pytest exit {r['pytest_exit_code']})")
    for step in ("compile_cell", "compile_model"):
        c = result(step).get("compiled")
        if not c:
            continue
        times = ", ".join(f"{k} {v:.0f} s" for k, v in c.get("compile_s", {}).items())
        print(f"  {step}: torch.compile({c['target']}, mode={c['mode']}, backend={c.get('backend')}): {c['status']}; "
              f"first calls {times or '-'}")
        for row in c.get("rows", []):
            print(f"    {row['path']:<26} {row['images_per_s']:8.1f} img/s  {row['speedup_vs_compiled_reference']:5.2f}x "
                  f"compiled reference")
    r = result("cellops")
    for row in r.get("rows", []):
        print(f"  cellops {row['op']:<12} {row['shape']:<12} {row['layout']:<13} {row['pass']:<7} fused "
              f"{row['fused_ms']:.3f} ms, eager {row['eager_ms']:.3f} ms ({row['speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "record":
        record(*args)
    elif cmd == "junit":
        junit(*args)
    elif cmd == "summary":
        sys.exit(summary(*args))
    else:
        sys.exit(f"unknown command {cmd!r}: record | junit | summary")
