"""torch.compile of the fast path against the eager fast path, side by side (CPU).

    python bench/bench_compile.py --json bench/results/compile_cpu.json          # demo model, batch 1 and 4
    python bench/bench_compile.py --batches 1 --repeats 3                       # quicker
    python bench/bench_compile.py --threads 1 --json bench/results/compile_cpu_1thread.json

Per batch: the eager fast path is called once first (it measures or loads the CPU plan, which the compiled
forward then runs; see LDEQ.cell_fn), then ``torch.compile(model, dynamic=False)`` (inductor) is called once
(first-call time: tracing + inductor), then eager and compiled are timed interleaved (E, C, E, C, ...),
medians of ``--repeats``.  Recorded with each row: the keypoints' largest difference compiled vs eager and
the eager fp32-vs-fp64 difference (the scale of rounding), dynamo's counters for that compile (distinct and
total graph breaks, graphs, frames, recompile-limit hits), the machine and its load average.  The JSON is
written after every row.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch._dynamo  # noqa: E402
from common import interleaved, machine_info, summary, write_json  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from ldeq_fast.model.weights import load_weights  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ldeq_fast", "assets", "demo_synthetic.pt")


class _LimitHits(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = []

    def emit(self, record):
        msg = record.getMessage()
        if "recompile_limit" in msg:
            self.hits.append(msg.splitlines()[1].strip() if "\n" in msg else msg)


def _dynamo_counts(hits: _LimitHits) -> dict:
    gb = counters["graph_break"]
    return {"graph_breaks_distinct": len(gb), "graph_breaks_total": sum(gb.values()),
            "graph_break_reasons": [k.splitlines()[0][:160] for k in gb],
            "unique_graphs": counters["stats"]["unique_graphs"], "frames": dict(counters["frames"]),
            "recompile_limit_hits": len(hits.hits), "recompile_limit_functions": hits.hits}


def _top_ops(fn, n: int = 12) -> dict:
    """Self CPU time (ms) of the n most expensive ops of one call of fn, and the call's total."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = {e.key[:80]: round(e.self_cpu_time_total / 1e3, 2) for e in rows[:n]}
    return {"total_self_ms": round(sum(e.self_cpu_time_total for e in rows) / 1e3, 1), "top": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=DEMO)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also record each path's top ops (one call, profiled)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hits = _LimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    logging.getLogger("torch._dynamo.convert_frame").addHandler(hits)
    model = load_weights(args.weights).eval()
    c = model.cfg
    result = {"what": "torch.compile(model) of the fast path (inductor, dynamic=False, the adaptive forward at the "
                      "model's own solver settings) vs the eager fast path; times per forward",
              "model": os.path.basename(args.weights), "config": {"max_iters": c.max_iters, "tol": c.tol,
                                                                   "check_every": c.check_every,
                                                                   "heatmap_size": c.heatmap_size},
              "machine": machine_info(), "rows": []}
    model64 = copy.deepcopy(model).double()
    for batch in args.batches:
        torch.manual_seed(batch)
        x = torch.randn(batch, 3, c.im_size, c.im_size).clamp(-2.1, 2.6)
        torch._dynamo.reset()
        counters.clear()
        hits.hits.clear()
        with torch.no_grad():
            eager = model(x)                                   # the CPU plan: measured or cached, applied
            want64 = model64(x.double())
            compiled = torch.compile(model, dynamic=False)
            t0 = time.perf_counter()
            got = compiled(x)
            first_s = time.perf_counter() - t0
            got = compiled(x)
            times = interleaved({"eager": lambda x=x: model(x), "compiled": lambda x=x, c=compiled: c(x)},
                                repeats=args.repeats, warmup=1)
        e, cm = summary(times["eager"], 1e3), summary(times["compiled"], 1e3)
        hm = c.heatmap_size
        row = {"batch": batch, "first_call_s": round(first_s, 1),
               "eager_ms": e, "compiled_ms": cm, "speedup_compiled_vs_eager": round(e["median"] / cm["median"], 3),
               "speedup_of_best_times": round(e["min"] / cm["min"], 3),
               "keypoints_max_diff_px": float((got.keypoints - eager.keypoints).abs().max()) * hm,
               "eager_fp32_vs_fp64_max_diff_px": float((eager.keypoints.double() - want64.keypoints).abs().max()) * hm,
               "backends_compiled": got.backends, "backends_eager": eager.backends,
               "cpu_plan_compiled": {k: v for k, v in got.extra.get("cpu_plan", {}).items() if k != "formats"},
               "dynamo": _dynamo_counts(hits), "load_average_after": [round(v, 2) for v in os.getloadavg()]}
        if args.profile:
            row["profile_top_ops_ms"] = {"eager": _top_ops(lambda x=x: model(x)), "compiled": _top_ops(lambda x=x, c=compiled: c(x))}
        result["rows"].append(row)
        print(f"batch {batch}: eager {e['median']:.1f} ms, compiled {cm['median']:.1f} ms "
              f"({row['speedup_compiled_vs_eager']}x), first call {first_s:.0f} s, "
              f"kp diff {row['keypoints_max_diff_px']:.2e} px (fp32-vs-fp64 {row['eager_fp32_vs_fp64_max_diff_px']:.2e}), "
              f"breaks {row['dynamo']['graph_breaks_distinct']}/{row['dynamo']['graph_breaks_total']}, "
              f"limit hits {row['dynamo']['recompile_limit_hits']}", flush=True)
        write_json(args.json, result)


if __name__ == "__main__":
    main()
