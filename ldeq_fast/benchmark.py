"""``ldeq-fast bench``: the model on random images, timed on every available path, side by side.

Each path is the same LDEQ weights run a different way (one model instance per path).  Paths are interleaved (A, B, A, B, ...) and
each figure is the median of the repeats, so drift on a noisy machine hits every path alike.  Peak memory
(live tensor bytes of one forward; the CUDA allocator's peak on GPU) is taken in an extra, untimed run.
Every row records the backend each fused op actually ran on (``backends``) and, on CPU, the fast path's
measured layout plan (``cpu_plan``, ldeq_fast/model/cpu_tuning.py: measured at the warm-up run, so not timed);
``fast_path_problems`` lists the fast rows that ran an op on the PyTorch reference (or a fast path that could
not run), and the command exits non-zero when there are any.

By default the reference and the fast path run (``DEFAULT_PATHS``); the published-semantics path is a parity
path, run on request (``paths=['published']``, CLI ``--paths published``).  The memory run solves
min(iterations, m) iterations: the solvers allocate their history up front, so its peak is the full solve's.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from ldeq_fast.config import LDEQConfig
from ldeq_fast.machine import finish_record, machine_info
from ldeq_fast.memory import peak_memory_bytes
from ldeq_fast.model.ldeq import LDEQ


@dataclass
class Path:
    name: str
    description: str
    config: dict = field(default_factory=dict)   # LDEQConfig overrides for this path
    available: bool = True
    why_unavailable: str = ""


def available_paths(device: torch.device) -> list[Path]:
    """Every way to run the model here.  The first path is the reference the others are compared with."""
    from ldeq_fast import _ext

    paths = [
        Path("reference", "per-sample Anderson, plain PyTorch solver and eager cell", {"backend": "torch"}),
        Path("published", "published semantics (batch-mean stop), eager", {"backend": "torch",
                                                                            "solver_semantics": "published"}),
    ]
    try:
        import ldeq_fast.solvers.fused  # noqa: F401

        fused_ok, why = True, ""
    except ImportError as exc:
        fused_ok, why = False, f"fused solver not importable: {exc}"
    if device.type == "cpu" and not _ext.has_cpp():
        fused_ok, why = False, _ext.missing_reason()
    paths.append(Path("fast", "fused solver engine and cell ops (C++ kernels on CPU, Triton on CUDA)",
                      {"backend": "auto"}, fused_ok, why))
    return paths


DEFAULT_PATHS = ("reference", "fast")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(batch_sizes=(1, 8), repeats=3, max_iters=None, small=False, device="cpu", seed=0,
              paths=None, progress=True) -> dict:
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = torch.device(device)
    torch.manual_seed(seed)
    cfg = LDEQConfig.small() if small else LDEQConfig()
    if max_iters is not None:
        cfg = cfg.replace(max_iters=int(max_iters))
    base = LDEQ(cfg).to(device).eval()
    all_paths = available_paths(device)
    paths = DEFAULT_PATHS if paths is None else paths
    unknown = sorted(set(paths) - {p.name for p in all_paths})
    if unknown:
        raise ValueError(f"unknown path(s) {unknown}; available: {[p.name for p in all_paths]}")
    all_paths = [p for p in all_paths if p.name in paths or p.name == "reference"]
    runnable = [p for p in all_paths if p.available]
    # one model per path, the same weights: switching one model between paths re-lays out its weights and
    # drops the fast path's per-weight caches (NCHW copies, Winograd transforms) before every timed call
    models = {}
    for p in runnable:
        models[p.name] = LDEQ(cfg.replace(**p.config)).to(device).eval()
        models[p.name].load_state_dict(base.state_dict())
    results = {"machine": machine_info(), "device": str(device), "config": cfg.to_dict(),
               "batch_sizes": list(batch_sizes), "repeats": repeats, "rows": [],
               "skipped": [{"path": p.name, "why": p.why_unavailable} for p in all_paths if not p.available]}
    total = sum(repeats + 2 for _ in batch_sizes) * len(runnable)
    warm_iters = 1  # warm-up: a one-iteration forward creates the kernels' per-shape state cheaply
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="ldeq-fast bench", unit="run", leave=False)
    for bs in batch_sizes:
        images = torch.randn(bs, 3, cfg.im_size, cfg.im_size, device=device)
        times = {p.name: [] for p in runnable}
        outs = {}
        for rep in range(repeats + 1):       # rep 0 is a cheap warm-up
            for p in runnable:
                model = models[p.name]
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model(images, max_iters=warm_iters if rep == 0 else None)
                _sync(device)
                dt = time.perf_counter() - t0
                if rep > 0:
                    times[p.name].append(dt)
                outs[p.name] = out
                if bar is not None:
                    bar.update(1)
        ref = outs[runnable[0].name].keypoints
        for p in runnable:
            out = outs[p.name]
            med = statistics.median(times[p.name])
            model = models[p.name]
            mem_iters = min(model.cfg.max_iters, max(2, model.cfg.anderson_m))
            with torch.no_grad():  # an extra, untimed forward: memory tracking slows every op on CPU
                peak = peak_memory_bytes(lambda imgs=images, n=mem_iters, m=model: m(imgs, max_iters=n), device)
            if bar is not None:
                bar.update(1)
            results["rows"].append({
                "path": p.name, "description": p.description, "batch": bs,
                "images_per_s": bs / med, "ms_per_image": 1e3 * med / bs, "times_s": times[p.name],
                "iterations": float(out.stats.nstep.float().mean()) if out.stats is not None else None,
                "max_kpt_diff_px": float((out.keypoints - ref).abs().max() * cfg.heatmap_size),
                "peak_mb": peak / 2 ** 20,
                "speedup_vs_reference": statistics.median(times[runnable[0].name]) / med,
                "backends": out.backends,
                **({"cpu_plan": out.extra["cpu_plan"]} if "cpu_plan" in out.extra else {}),
            })
    if bar is not None:
        bar.close()
    results["fast_path_problems"] = fast_path_problems(results)
    finish_record(results["machine"])
    return results


FAST_PATHS = ("fast",)


def fast_path_problems(res: dict) -> list[str]:
    """What keeps a fast row from being the fast path: an op that ran on the reference, or the path skipped."""
    out = [f"{s['path']} path not run: {s['why']}" for s in res["skipped"] if s["path"] in FAST_PATHS]
    for r in res["rows"]:
        slow = sorted(op for op, b in r.get("backends", {}).items() if "torch" in b.split(","))
        if r["path"] in FAST_PATHS and slow:
            out.append(f"{r['path']} path at batch {r['batch']} ran {slow} on the PyTorch reference")
    return out


def format_table(res: dict) -> str:
    lines = [f"ldeq-fast bench on {res['machine']['cpu']} ({res['machine']['cores']} cores), device {res['device']}, "
             f"torch {res['machine']['torch']}; median of {res['repeats']} interleaved runs",
             f"{'path':<10} {'batch':>5} {'images/s':>9} {'ms/image':>9} {'iters':>6} {'max dkpt px':>11} "
             f"{'peak MB':>8} {'speedup':>8}"]
    for r in res["rows"]:
        it = "-" if r["iterations"] is None else f"{r['iterations']:.1f}"
        lines.append(f"{r['path']:<10} {r['batch']:>5} {r['images_per_s']:>9.2f} {r['ms_per_image']:>9.1f} {it:>6} "
                     f"{r['max_kpt_diff_px']:>11.2e} {r['peak_mb']:>8.0f} {r['speedup_vs_reference']:>7.2f}x")
    for s in res["skipped"]:
        lines.append(f"(skipped {s['path']}: {s['why']})")
    fast = [r for r in res["rows"] if r["path"] in FAST_PATHS]
    if fast:
        ran = sorted({f"{op}={b}" for r in fast for op, b in r["backends"].items()})
        lines.append("fast path ran: " + ", ".join(ran))
    for r in fast:
        if "cpu_plan" in r:
            p = r["cpu_plan"]
            src = "measured now" if p["source"] == "measured" else "from the cache, measured"
            lines.append(f"fast path CPU plan at batch {r['batch']} ({src} at batch {p['measured_batch']}): "
                         f"{p['nhwc_convs']} convs channels_last, {p['nchw_convs']} NCHW, {p.get('winograd_convs', 0)} "
                         f"Winograd; oneDNN conv+add on {p['post_add']} of {p['split_convs']} split convs")
    for problem in res.get("fast_path_problems", []):
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


def save_json(res: dict, path) -> None:
    """Write ``res`` as JSON atomically (a temporary file beside it, then a rename: never a torn file)."""
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, path)
