"""torchdeq's own Anderson vs ldeq_fast's Anderson registered in torchdeq ('ldeq_fast_anderson').

The DEQ is torchdeq's (get_deq, IFT backward); only the solver differs.  The fixed-point map is a
convolutional cell z -> tanh(GroupNorm(conv3x3(z) + injection)) on (B, C, H, W) states, cheap enough that
solver overhead shows.  Two schedules: ``fixed`` (tol = 0: both run exactly max_iter evaluations, so the
time per evaluation compares the solvers' own work) and ``tol`` (tol = 1e-4 abs: torchdeq stops when the
worst sample converges, ldeq_fast freezes each sample as it converges).

    python bench/bench_torchdeq_adapter.py --quick --json bench/results/torchdeq_adapter.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

SOLVERS = ("anderson", "ldeq_fast_anderson")


class Cell(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(1, channels)
        with torch.no_grad():  # a contraction: the fixed point exists and both solvers reach it
            self.conv.weight.mul_(0.3)

    def forward(self, z, injection):
        return torch.tanh(self.norm(self.conv(z) + injection))


def make_deq(solver: str, max_iter: int, tol: float):
    import torchdeq

    return torchdeq.get_deq(f_solver=solver, b_solver=solver, f_max_iter=max_iter, b_max_iter=max_iter,
                            f_tol=tol, b_tol=tol, f_stop_mode="abs", b_stop_mode="abs", ift=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, repeats: int, device) -> list[float]:
    fn()  # warm-up (kernel selection, allocator)
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def run(batch: int, channels: int, size: int, max_iter: int, repeats: int, device: torch.device) -> list[dict]:
    import ldeq_fast.compat.torchdeq as adapter

    torch.manual_seed(0)
    cell = Cell(channels).to(device)
    x = torch.randn(batch, channels, size, size, device=device)
    z0 = torch.zeros_like(x)
    rows = []
    for schedule, tol in (("fixed", 0.0), ("tol", 1e-4)):
        for solver in SOLVERS:
            deq = make_deq(solver, max_iter, tol)
            info = {}

            def forward(train: bool, deq=deq, info=info):
                deq.train(train)
                with torch.set_grad_enabled(train):
                    z_out, stat = deq(lambda z: cell(z, x), z0)
                    if train:
                        z_out[-1].square().mean().backward()
                info.update(nstep=stat["nstep"].float().mean().item(), abs=stat["abs_lowest"].max().item())

            for mode in ("eval", "train"):
                times = time_call(lambda mode=mode: forward(mode == "train"), repeats, device)
                rows.append({"solver": solver, "schedule": schedule, "tol": tol, "mode": mode, "batch": batch,
                             "state": [channels, size, size], "max_iter": max_iter,
                             "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                             "repeats": repeats, "mean_nstep": info["nstep"], "max_abs_residual": info["abs"],
                             "engine_backend": adapter.default_backend()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke run, not a measurement)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", default=None, help="write the results (with the machine) to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.channels, a.size, a.max_iter, a.repeats = 2, 8, 8, 6, 2
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = run(a.batch, a.channels, a.size, a.max_iter, a.repeats, device)
    print(f"{'solver':<20}{'schedule':<9}{'mode':<7}{'median ms':>10}{'nstep':>7}{'max |f(z)-z|':>14}")
    for r in rows:
        print(f"{r['solver']:<20}{r['schedule']:<9}{r['mode']:<7}{r['median_ms']:>10.2f}{r['mean_nstep']:>7.1f}"
              f"{r['max_abs_residual']:>14.2e}")
    if a.json:
        from ldeq_fast.machine import machine_info

        with open(a.json, "w") as fh:
            json.dump({"bench": "torchdeq_adapter", "quick": a.quick, "device": str(device),
                       "machine": machine_info(), "results": rows}, fh, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
