"""How much glibc's allocator moves the CPU comparison: `ldeq-fast bench` in fresh processes with the default
allocator and with glibc's mmap/trim thresholds raised (large tensors kept instead of unmapped and page-faulted
in again on every allocation), alternating, medians over the rounds.

    python bench/allocator_effect.py --json bench/results/allocator_effect_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import machine_info, write_json

RAISED = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
          "MALLOC_TOP_PAD_": "1073741824"}
SETTINGS = {"default": {}, "raised_thresholds": RAISED}


def run_bench(env_extra: dict, batch: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        env = {k: v for k, v in os.environ.items() if k not in RAISED}
        env.update(env_extra)
        cmd = [sys.executable, "-m", "ldeq_fast.cli", "bench", "--batch", str(batch), "--repeats", str(repeats),
               "--paths", "fast", "--no-progress", "--json", out]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as fh:
            return json.load(fh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per bench (median inside each)")
    p.add_argument("--rounds", type=int, default=2, help="fresh-process runs per setting, alternating")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    per = {name: {"reference": [], "fast": []} for name in SETTINGS}
    for _ in range(a.rounds):
        for name, env in SETTINGS.items():
            res = run_bench(env, a.batch, a.repeats)
            for row in res["rows"]:
                per[name][row["path"]].append(row["images_per_s"])
    summary = {name: {path: statistics.median(v) for path, v in d.items()} for name, d in per.items()}
    for s in summary.values():
        s["fast_vs_reference"] = s["fast"] / s["reference"]
    d, r = summary["default"], summary["raised_thresholds"]
    res = {"machine": machine_info(), "batch": a.batch, "repeats": a.repeats, "rounds": a.rounds,
           "raised_env": RAISED, "images_per_s": per, "median": summary,
           "raised_vs_default": {"reference": r["reference"] / d["reference"], "fast": r["fast"] / d["fast"]}}
    print(f"batch {a.batch}: default allocator fast/reference {d['fast_vs_reference']:.2f}x; raised thresholds "
          f"{r['fast_vs_reference']:.2f}x (reference {res['raised_vs_default']['reference']:.2f}x, fast "
          f"{res['raised_vs_default']['fast']:.2f}x of their default-allocator speed)")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
