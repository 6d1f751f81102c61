"""Training-step benchmark: peak memory and time per sample, our fast path vs the published training
semantics (eager published Anderson forward + hook-based IFT backward with the same solver on VJPs).

Each (path, batch) measurement runs in a fresh subprocess so the process's peak RSS is that step's peak
(CPU) — on CUDA, torch.cuda.max_memory_allocated.  Paths are interleaved over repeats; medians reported.

    python bench/bench_train.py --batch 2,4 --repeats 3 --json bench/results/train_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

PATHS = ("fast", "published")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def published_training_step(model, images, kpts, opt):
    """The published recipe: no-grad published Anderson, one tracked step, backward hook solving the
    adjoint fixed point with published Anderson on vector-Jacobian products."""
    from ldeq_fast.model.layers import heatmaps_to_keypoints
    from ldeq_fast.solvers.published import anderson_published

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
    kp = heatmaps_to_keypoints(model.heatmaps_from_z(z_new))[0]
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

    torch.manual_seed(0)
    cfg = (LDEQConfig.small() if small else LDEQConfig()).replace(max_iters=max_iters, grad_mode="ift")
    cfg = cfg.replace(backend="auto" if path == "fast" else "torch")
    model = LDEQ(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, cfg.im_size, cfg.im_size, device=device)
    kpts = torch.rand(batch, cfg.n_keypoints, 2, device=device)
    step = fast_training_step if path == "fast" else published_training_step
    step(model, images, kpts, opt)                  # warm-up: allocator, oneDNN primitives, optimizer state
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    t0 = time.perf_counter()
    iters = step(model, images, kpts, opt)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"path": path, "batch": batch, "seconds": time.perf_counter() - t0, "peak_mb": peak,
            "fwd_iters": iters}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-iters", type=int, default=10)
    p.add_argument("--small", action="store_true", help="narrow 128x128 model (smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("PATH", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.small, a.device, a.max_iters)))
        return 0
    from ldeq_fast.machine import machine_info

    batches = [int(b) for b in a.batch.split(",")]
    runs: dict = {}
    for rep in range(a.repeats):
        for b in batches:
            for path in PATHS:           # interleaved
                cmd = [sys.executable, __file__, "--child", path, str(b), "--device", a.device,
                       "--max-iters", str(a.max_iters)] + (["--small"] if a.small else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault((path, b), []).append(r)
                print(f"rep {rep} {path:>9} batch {b}: {r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB",
                      file=sys.stderr)
    rows = []
    for (path, b), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        sec = statistics.median(r["seconds"] for r in rs)
        mem = statistics.median(r["peak_mb"] for r in rs)
        rows.append({"path": path, "batch": b, "s_per_sample": sec / b, "peak_mb_per_sample": mem / b,
                     "seconds": [r["seconds"] for r in rs], "peak_mb": [r["peak_mb"] for r in rs],
                     "fwd_iters": rs[0]["fwd_iters"]})
    for b in batches:
        f = next(r for r in rows if r["path"] == "fast" and r["batch"] == b)
        ref = next(r for r in rows if r["path"] == "published" and r["batch"] == b)
        f["time_ratio_vs_published"] = f["s_per_sample"] / ref["s_per_sample"]
        f["memory_ratio_vs_published"] = f["peak_mb_per_sample"] / ref["peak_mb_per_sample"]
    res = {"machine": machine_info(), "device": a.device, "small": a.small, "max_iters": a.max_iters,
           "repeats": a.repeats, "rows": rows}
    print(f"{'path':>10} {'batch':>5} {'s/sample':>9} {'MB/sample':>10} {'time ratio':>10} {'mem ratio':>9}")
    for r in rows:
        tr = r.get("time_ratio_vs_published")
        mr = r.get("memory_ratio_vs_published")
        print(f"{r['path']:>10} {r['batch']:>5} {r['s_per_sample']:>9.3f} {r['peak_mb_per_sample']:>10.1f} "
              f"{'' if tr is None else f'{tr:.2f}':>10} {'' if mr is None else f'{mr:.2f}':>9}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
