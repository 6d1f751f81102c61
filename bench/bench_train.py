"""Training-step benchmark: peak memory and time per sample, our fast path vs the published training
semantics (eager published Anderson forward + hook-based IFT backward with the same solver on VJPs).

Each measurement is a warm-up step, a timed step, then a step whose peak memory is taken
(torch.cuda.max_memory_allocated above the step's start on CUDA, peak live tensor bytes on CPU).  On CPU each
measurement runs in a fresh subprocess (the C library's retained heap would mix between runs); on CUDA in
this process (the allocator's peak is reset per step, and a process start costs seconds of GPU lease).
Paths are interleaved over repeats; medians reported.

    python bench/bench_train.py --batch 2,4 --repeats 3 --json bench/results/train_cpu.json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys

import torch
from common import time_once, write_json

PATHS = ("fast", "published")


def published_training_step(model, images, kpts, opt):
    """The published recipe: no-grad published Anderson, one tracked step, backward hook solving the
    adjoint fixed point with published Anderson on vector-Jacobian products."""
    from ldeq_fast.ops import note
    from ldeq_fast.ops.heatmap import heatmap_keypoints_ref
    from ldeq_fast.solvers.published import anderson_published

    note("solver", "torch")  # the published Anderson, plain PyTorch
    c = model.cfg
    x = model.tail(images)
    f = model.cell_fn(x)
    z0 = model.zeros_z0(images)
    with torch.no_grad():
        z_star, st = anderson_published(f, z0, c.max_iters, c.tol, c.stop_mode, c.anderson_m, c.anderson_lam,
                                        c.anderson_beta)
    z_star = z_star.requires_grad_()
    z_new = f(z_star)
    handle = []

    def hook(grad):
        handle[0].remove()

        def adjoint(y):
            return torch.autograd.grad(z_new, z_star, y, retain_graph=True)[0] + grad

        sol, _ = anderson_published(adjoint, torch.zeros_like(grad), c.max_iters, c.tol, c.stop_mode,
                                    c.anderson_m, c.anderson_lam, c.anderson_beta)
        return sol

    handle.append(z_new.register_hook(hook))
    kp = heatmap_keypoints_ref(model.heatmaps_from_z(z_new))[0]
    loss = (kp - kpts).abs().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(st.nstep[0])


def fast_training_step(model, images, kpts, opt):
    out = model(images)
    loss = (out.keypoints - kpts).abs().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(out.stats.nstep.float().mean())


def child(path: str, batch: int, small: bool, device: str, max_iters: int) -> dict:
    from ldeq_fast import LDEQ, LDEQConfig
    from ldeq_fast.memory import peak_memory_bytes
    from ldeq_fast.ops import recording_backends

    torch.manual_seed(0)
    cfg = (LDEQConfig.small() if small else LDEQConfig()).replace(max_iters=max_iters, grad_mode="ift")
    cfg = cfg.replace(backend="auto" if path == "fast" else "torch")
    model = LDEQ(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, cfg.im_size, cfg.im_size, device=device)
    kpts = torch.rand(batch, cfg.n_keypoints, 2, device=device)
    step = fast_training_step if path == "fast" else published_training_step
    step(model, images, kpts, opt)                  # warm-up: allocator, oneDNN primitives, optimizer state
    result = {}
    with recording_backends() as ran:
        seconds = time_once(lambda: result.update(iters=step(model, images, kpts, opt)), device)
    iters = result["iters"]
    # peak memory in a third, untimed step (CPU: peak live tensor bytes; process RSS would mix in the
    # C library's retained heap)
    peak = peak_memory_bytes(lambda: step(model, images, kpts, opt), device)
    return {"path": path, "batch": batch, "seconds": seconds, "peak_mb": peak / 2 ** 20, "fwd_iters": iters,
            "backends": dict(sorted(ran.items()))}


def _memory_fit(rows, path: str, budget_mb: float) -> dict | None:
    """Straight line peak = fixed + per_sample * batch through the smallest and largest measured batch: the
    marginal memory per sample, and the largest batch whose peak fits ``budget_mb`` (an extrapolation)."""
    pts = sorted((r["batch"], r["peak_mb_per_sample"] * r["batch"]) for r in rows if r["path"] == path)
    if len(pts) < 2:
        return None
    (b0, m0), (b1, m1) = pts[0], pts[-1]
    slope = (m1 - m0) / (b1 - b0)
    fixed = m0 - slope * b0
    return {"fixed_mb": fixed, "marginal_mb_per_sample": slope,
            "max_batch_in_budget": max(0, int((budget_mb - fixed) // slope)) if slope > 0 else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-iters", type=int, default=10)
    p.add_argument("--small", action="store_true", help="narrow 128x128 model (smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-gb", type=float, default=16.0, help="memory budget for the largest-batch column")
    p.add_argument("--isolation", choices=("auto", "process", "none"), default="auto",
                   help="a subprocess per measurement (auto: on CPU only)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("PATH", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.small, a.device, a.max_iters)))
        return 0
    from ldeq_fast.machine import finish_record, machine_info

    batches = [int(b) for b in a.batch.split(",")]
    isolate = a.isolation == "process" or (a.isolation == "auto" and not a.device.startswith("cuda"))
    machine = machine_info()   # before the measurement; finish_record adds the load after it
    runs: dict = {}
    for rep in range(a.repeats):
        for b in batches:
            for path in PATHS:           # interleaved
                if isolate:
                    cmd = [sys.executable, __file__, "--child", path, str(b), "--device", a.device,
                           "--max-iters", str(a.max_iters)] + (["--small"] if a.small else [])
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise RuntimeError(f"{path} batch {b} failed:\n{out.stderr[-3000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    r = child(path, b, a.small, a.device, a.max_iters)
                    gc.collect()
                    if a.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                slot = runs.setdefault((path, b), {"seconds": [], "peak_mb": [], "fwd_iters": r["fwd_iters"],
                                                   "backends": r["backends"]})
                slot["seconds"].append(r["seconds"])
                slot["peak_mb"].append(r["peak_mb"])
                print(f"rep {rep} {path:>9} batch {b}: {r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB",
                      file=sys.stderr)
    rows = []
    for (path, b), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append({"path": path, "batch": b, "s_per_sample": statistics.median(rs["seconds"]) / b,
                     "peak_mb_per_sample": statistics.median(rs["peak_mb"]) / b, **rs})
    for b in batches:
        f = next(r for r in rows if r["path"] == "fast" and r["batch"] == b)
        ref = next(r for r in rows if r["path"] == "published" and r["batch"] == b)
        f["time_ratio_vs_published"] = f["s_per_sample"] / ref["s_per_sample"]
        f["memory_ratio_vs_published"] = f["peak_mb_per_sample"] / ref["peak_mb_per_sample"]
    budget_mb = a.budget_gb * 1024
    fits = {path: _memory_fit(rows, path, budget_mb) for path in PATHS}
    res = {"machine": finish_record(machine), "device": a.device, "small": a.small, "max_iters": a.max_iters,
           "repeats": a.repeats, "isolation": "subprocess per measurement" if isolate else "in process",
           "peak_memory": "torch.cuda.max_memory_allocated above the step's start"
           if a.device.startswith("cuda") else "peak live tensor bytes of the step (ldeq_fast.memory)",
           "budget_gb": a.budget_gb, "memory_fit": fits, "rows": rows}
    print(f"{'path':>10} {'batch':>5} {'s/sample':>9} {'MB/sample':>10} {'time ratio':>10} {'mem ratio':>9}")
    for r in rows:
        tr = r.get("time_ratio_vs_published")
        mr = r.get("memory_ratio_vs_published")
        print(f"{r['path']:>10} {r['batch']:>5} {r['s_per_sample']:>9.3f} {r['peak_mb_per_sample']:>10.1f} "
              f"{'' if tr is None else f'{tr:.2f}':>10} {'' if mr is None else f'{mr:.2f}':>9}")
    for path, fit in fits.items():
        if fit:
            print(f"{path:>10}: peak = {fit['fixed_mb']:.0f} MB + {fit['marginal_mb_per_sample']:.1f} MB x batch; "
                  f"largest batch in {a.budget_gb:g} GB: {fit['max_batch_in_budget']}")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
