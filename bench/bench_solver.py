"""Benchmark the fused Anderson solver against the reference path and torchdeq's Anderson.

    python bench/bench_solver.py --json bench/results/solver_cpu.json          # B=8, D=98*64*64, m=6
    python bench/bench_solver.py --quick                                       # smoke run, < 30 s
    python bench/bench_solver.py --device cuda --json $OUT/solver_cuda.json    # GPU (Triton kernels)

Measured, methods interleaved (the order alternating between repeats), medians of --repeats:
* f alone (a cheap elementwise map z -> 0.5 tanh(z) + c, so the solver's own cost dominates);
* per-iteration time of a fixed number of iterations (tol = 0), and overhead = per-iteration - f;
* time and f-evaluations to tolerance;
* f-evaluations to tolerance (1e-4, 1e-5, 1e-6) with lam_mode 'absolute' vs 'scaled' on a coupled map;
* the update/mix kernels in GB/s and as a fraction of a copy's bandwidth (on CUDA timed over many calls
  replayed from a CUDA graph with CUDA events; on CPU by the wall clock);
* on CUDA also a fixed-iteration solve captured in a CUDA graph (replay time vs eager).
Before timing, the fixed points of the fused path, the reference and torchdeq are compared; the
script exits non-zero if they differ by more than 1e-5 (relative).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine_info, summary, table, write_json  # noqa: E402

from ldeq_fast.ops import anderson as A  # noqa: E402
from ldeq_fast.solvers import solve  # noqa: E402
from ldeq_fast.solvers.fused import anderson_fused  # noqa: E402

AGREEMENT_RTOL = 1e-5


def torchdeq_anderson():
    """torchdeq's Anderson solver (``torchdeq.solver.get_solver('anderson')``), or None if not installed."""
    try:
        from torchdeq.solver import get_solver
    except Exception:  # noqa: BLE001 - optional comparison
        return None
    return get_solver("anderson")


class Counted:
    """f with an evaluation counter."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def cheap_map(B, D, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, D, generator=g, dtype=dtype).to(device)

    def f(z):
        return 0.5 * torch.tanh(z) + c

    return f


def coupled_map(B, D, device, dtype, rho=0.97, seed=1):
    """tanh(W z + c) with the state seen as (B, C, D/C) and W (C x C) of spectral norm rho: a slowly
    contracting, non-diagonal map (Anderson's regulariser matters here)."""
    C = 98 if D % 98 == 0 else 1
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, C, generator=g, dtype=torch.float64)
    W = (rho * W / torch.linalg.matrix_norm(W, 2)).to(dtype).to(device)
    c = torch.randn(B, D, generator=g, dtype=dtype).to(device)

    def f(z):
        zc = z.reshape(B, C, D // C)
        return torch.tanh(torch.matmul(W, zc).reshape(B, D) + c)

    return f


def solvers(fused_backend: str, m: int, lam: float):
    """name -> callable(f, z0, max_iter, tol) returning the fixed point."""
    tdq = torchdeq_anderson()
    out = {
        "fused": lambda f, z0, it, tol: anderson_fused(f, z0, max_iter=it, tol=tol, m=m, lam=lam,
                                                       backend=fused_backend)[0],
        "reference": lambda f, z0, it, tol: solve(f, z0, max_iter=it, tol=tol, m=m, lam=lam, backend="torch")[0],
    }
    if tdq is not None:
        # torchdeq 0.1.0: absolute lam, stops when the batch max residual < tol, returns f(x_best)
        out["torchdeq"] = lambda f, z0, it, tol: tdq(f, z0, max_iter=it, tol=tol, stop_mode="rel", m=m, lam=lam)[0]
    return out


def agreement(methods, f, z0, max_iter=60, tol=1e-6) -> dict:
    zs = {name: run(f, z0, max_iter, tol) for name, run in methods.items()}
    ref = zs["reference"]
    rel = {name: ((z - ref).norm() / ref.norm()).item() for name, z in zs.items() if name != "reference"}
    if "torchdeq" in zs:
        rel["fused_vs_torchdeq"] = ((zs["fused"] - zs["torchdeq"]).norm() / zs["torchdeq"].norm()).item()
    return rel


def per_call_seconds(methods: dict, device, repeats: int) -> tuple[dict, str]:
    """Median seconds per call of each method.  CUDA: each method captured in a CUDA graph and replayed over
    many calls, timed with CUDA events (triton.testing.do_bench_cudagraph) -- device time without launch gaps
    (a 25 us kernel cannot be timed as one call between two host syncs); methods interleaved over
    ``repeats`` rounds.  CPU: the wall clock of synchronised calls, interleaved."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench_cudagraph

        times, names = {name: [] for name in methods}, list(methods)
        for rep in range(repeats):   # the order alternates between rounds, as in common.interleaved
            for name in (names if rep % 2 == 0 else names[::-1]):
                times[name].append(do_bench_cudagraph(methods[name], rep=50, return_mode="median") * 1e-3)
        return times, "CUDA graph replays timed with CUDA events (triton.testing.do_bench_cudagraph), median"
    return interleaved(methods, repeats=repeats, warmup=2, device=device), "wall clock per synchronised call"


def kernel_bandwidth(B, D, m, device, dtype, repeats) -> dict:
    """The update and mix passes alone, in GB/s, next to a device-to-device copy (on CUDA one of 1 GiB, well
    past the L2 cache, as the ceiling)."""
    backend = A.resolve_backend(torch.empty(0, device=device))
    ops = A.ops_for(backend, torch.device(device).type)
    es = torch.empty(0, dtype=dtype).element_size()
    F = torch.randn(B, m, D, device=device, dtype=dtype)
    G = torch.randn(B, m, D, device=device, dtype=dtype)
    gram = torch.zeros(B, m, m, device=device, dtype=A.acc_dtype(dtype))
    fx, x = torch.randn(B, D, device=device, dtype=dtype), torch.randn(B, D, device=device, dtype=dtype)
    best = x.clone()
    copy_numel = max(B * D, 2**30 // es) if torch.device(device).type == "cuda" else B * D
    src = torch.randn(copy_numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    flags = torch.zeros(4, B, dtype=torch.bool, device=device)
    flags[0] = True
    alpha = torch.full((B, m), 1.0 / m, device=device, dtype=A.acc_dtype(dtype))
    times, timer = per_call_seconds({
        "copy": lambda: dst.copy_(src),
        "update": lambda: ops.update(fx, x, F, G, gram, flags[0], m - 1, m),
        "mix": lambda: ops.mix(F, G, alpha, flags, x, best, m - 1, m, 1.0, True),
    }, device, repeats)
    state = B * D * es
    moved = {"copy": 2 * copy_numel * es, "update": (m + 3) * state, "mix": (m + 1) * state}  # reads + writes
    out = {"backend": backend, "timer": timer, "copy_bytes": copy_numel * es}
    for name, t in times.items():
        med = summary(t)["median"]
        out[name] = {"ms": med * 1e3, "GB_per_s": moved[name] / med / 1e9}
    for name in ("update", "mix"):
        out[name]["fraction_of_copy"] = out[name]["GB_per_s"] / out["copy"]["GB_per_s"]
    return out


def cuda_graph_replay(f, z0, fused_backend, iters, m, repeats) -> dict:
    static = z0.clone()

    def run():
        return anderson_fused(f, static, max_iter=iters, tol=0.0, m=m, backend=fused_backend, fixed_iters=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z_graph, _ = run()
    times = interleaved({"eager": run, "graph_replay": graph.replay}, repeats=repeats, warmup=1, device="cuda")
    z_eager, _ = run()
    return {"iters": iters,
            "eager_ms_per_iter": summary(times["eager"])["median"] * 1e3 / iters,
            "graph_ms_per_iter": summary(times["graph_replay"])["median"] * 1e3 / iters,
            "graph_matches_eager_rel": ((z_graph - z_eager).norm() / z_eager.norm()).item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write results here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--D", type=int, default=98 * 64 * 64)
    p.add_argument("--m", type=int, default=6)
    p.add_argument("--lam", type=float, default=1e-4)
    p.add_argument("--iters", type=int, default=12, help="iterations for the per-iteration timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4, help="tolerance (rel) for the time-to-tolerance runs")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads (0: torch's default); 1 avoids OpenMP spin-wait noise on a busy machine")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.B, args.D, args.iters, args.repeats = 2, 98 * 16 * 16, 6, 3
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = torch.float32
    B, D, m = args.B, args.D, args.m
    probe = torch.empty(0, device=device)
    fused_backend = A.resolve_backend(probe)
    results = {"machine": machine_info(device), "config": {**vars(args), "fused_backend": fused_backend,
                                                            "dtype": str(dtype)}}
    methods = solvers(fused_backend, m, args.lam)
    if "torchdeq" not in methods:
        results["torchdeq"] = "not installed: skipped"

    f = cheap_map(B, D, device, dtype)
    z0 = torch.zeros(B, D, device=device, dtype=dtype)

    # 1. the fixed points agree (fail loudly otherwise)
    rel = agreement(methods, f, z0)
    results["agreement_rel"] = rel
    print("fixed-point agreement (relative):", {k: f"{v:.2e}" for k, v in rel.items()})
    if max(rel.values()) > AGREEMENT_RTOL:
        write_json(args.json, results)
        raise SystemExit(f"FAIL: fixed points differ by more than {AGREEMENT_RTOL} (relative): {rel}")

    # 2. per-iteration cost: fixed iteration count, nobody stops (tol = 0)
    x = torch.randn(B, D, device=device, dtype=dtype)
    timed = {"f": lambda: f(x)}
    timed.update({name: (lambda run=run: run(f, z0, args.iters, 0.0)) for name, run in methods.items()})
    times = interleaved(timed, repeats=args.repeats, warmup=1, device=device)
    t_f = summary(times["f"])["median"]
    per_iter = {}
    for name in methods:
        t = summary(times[name])["median"] / args.iters
        per_iter[name] = {"ms_per_iter": t * 1e3, "overhead_ms_per_iter": (t - t_f) * 1e3}
    results["f_ms"] = t_f * 1e3
    results["per_iteration"] = per_iter
    ov = per_iter["fused"]["overhead_ms_per_iter"]
    results["overhead_ratio"] = {f"{name}/fused": per_iter[name]["overhead_ms_per_iter"] / ov
                                 for name in methods if name != "fused" and ov > 0}

    # 3. time and evaluations to tolerance
    counted = Counted(f)
    to_tol = {}
    evals = {}
    for name, run in methods.items():
        counted.calls = 0
        run(counted, z0, 50, args.tol)
        evals[name] = counted.calls
    times = interleaved({name: (lambda run=run: run(f, z0, 50, args.tol)) for name, run in methods.items()},
                        repeats=args.repeats, warmup=0, device=device)
    for name in methods:
        to_tol[name] = {"ms": summary(times[name])["median"] * 1e3, "f_evals": evals[name]}
    results["to_tolerance"] = to_tol

    # 4. regulariser: iterations to tolerance on a harder map; absolute lam stalls once ||g||^2 << lam
    hard = coupled_map(B, D, device, dtype)
    lam_runs = {}
    for tol in (1e-4, 1e-5, 1e-6):
        for lam_mode in ("absolute", "scaled"):
            _, st = anderson_fused(hard, z0, max_iter=100, tol=tol, m=m, lam=args.lam, lam_mode=lam_mode,
                                   backend=fused_backend)
            lam_runs[f"{lam_mode}@{tol:g}"] = {"nstep_per_sample": st.nstep.tolist(),
                                               "converged": st.converged.tolist()}
    results["lam_mode_iterations"] = lam_runs

    # 5. the two bandwidth-bound passes alone; on CUDA also graph capture
    results["kernels"] = kernel_bandwidth(B, D, m, device, dtype, args.repeats if device.type == "cuda" else 2 * args.repeats)
    if device.type == "cuda":
        results["cuda_graph"] = cuda_graph_replay(f, z0, fused_backend, args.iters, m, args.repeats)

    write_json(args.json, results)
    rows = [{"method": name, "ms/iter": per_iter[name]["ms_per_iter"],
             "overhead ms/iter": per_iter[name]["overhead_ms_per_iter"],
             "to tol ms": to_tol[name]["ms"], "f evals to tol": to_tol[name]["f_evals"]} for name in methods]
    print(f"machine: {results['machine'].get('cpu')} | gpu: {results['machine'].get('gpu')} | "
          f"load before/after: {results['machine'].get('load_average_before')} / "
          f"{results['machine'].get('load_average_after')}")
    print(f"B={B} D={D} m={m} device={device.type} fused backend={fused_backend} f={t_f * 1e3:.3g} ms")
    print(table(rows, ["method", "ms/iter", "overhead ms/iter", "to tol ms", "f evals to tol"]))
    print("overhead ratios:", {k: round(v, 2) for k, v in results["overhead_ratio"].items()})
    print("f evals to tolerance on the coupled map (max over samples): "
          + ", ".join(f"{k}: {max(v['nstep_per_sample'])}" for k, v in lam_runs.items()))
    k = results["kernels"]
    print(f"copy {k['copy']['GB_per_s']:.1f} GB/s | update {k['update']['GB_per_s']:.1f} GB/s "
          f"({k['update']['fraction_of_copy']:.0%} of copy) | mix {k['mix']['GB_per_s']:.1f} GB/s "
          f"({k['mix']['fraction_of_copy']:.0%} of copy)")
    if device.type == "cuda":
        g = results["cuda_graph"]
        print(f"CUDA graph replay {g['graph_ms_per_iter']:.3f} vs eager {g['eager_ms_per_iter']:.3f} ms/iter")
    return results


if __name__ == "__main__":
    main()
