"""Benchmark the fused cell ops against their eager PyTorch compositions.

    python bench/bench_cellops.py --json bench/results/cellops_cpu.json     # the model's shapes
    python bench/bench_cellops.py --quick                                   # smoke run, small shapes
    python bench/bench_cellops.py --device cuda --json $OUT/cellops_cuda.json

Measured, methods interleaved, medians of --repeats (ms per call; each timing covers --inner back-to-back
calls so every method sees its own inputs in cache rather than the previous method's leftovers):
* leaky_relu_group_norm (LeakyReLU -> GroupNorm, G=1 as in the model) vs F.leaky_relu + F.group_norm,
  NCHW and channels_last, forward (no grad) and forward + backward (dx, dweight, dbias); and with the
  hourglass's residual connection added in the output pass (``residual=``) vs the eager ops + add, forward;
* the heatmap head as the model runs it, softargmax_heatmaps then heatmap_keypoints (keypoints, spread,
  published uncertainty), vs their references, forward and forward + backward (to h and a learnt beta);
  softargmax_heatmaps alone, forward.
Before timing, each fused op is compared with its reference (values and gradients); the script exits
non-zero if they differ by more than 1e-4 relative to the largest reference value.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine_info, summary, table, write_json  # noqa: E402

from ldeq_fast.ops import heatmap as hmo  # noqa: E402
from ldeq_fast.ops import leaky_relu_group_norm as gn  # noqa: E402
from ldeq_fast.ops import resolve  # noqa: E402

AGREEMENT = 1e-4
GN_SHAPES = [(8, 224, 64, 64), (8, 320, 4, 4), (1, 224, 64, 64)]
HEAD_SHAPES = [(8, 98, 64, 64), (1, 98, 64, 64)]
QUICK_GN_SHAPES = [(2, 32, 16, 16), (2, 48, 4, 4)]
QUICK_HEAD_SHAPES = [(2, 8, 16, 16)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def eager_gn(x, w, b):
    return F.group_norm(F.leaky_relu(x, 0.01), 1, w, b, 1e-5)


def blocks(methods: dict, inner: int) -> dict:
    """Each method run ``inner`` times per timing."""
    def block(fn):
        def run():
            for _ in range(inner):
                fn()
        return run
    return {name: block(fn) for name, fn in methods.items()}


def per_call(times: dict, inner: int) -> dict:
    return {k: summary(v, 1e3 / inner) for k, v in times.items()}


def gn_case(shape, channels_last, device, backend, repeats, inner):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w = torch.randn(C, generator=g).to(device).requires_grad_()
    b = torch.randn(C, generator=g).to(device).requires_grad_()
    grad = torch.randn(shape, generator=g).to(device)
    if channels_last:  # upstream gradients arrive in the output's memory format
        grad = grad.to(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_()

    def fused(t):
        return gn.leaky_relu_group_norm(t, w, b, 1, backend=backend)

    # agreement, values and gradients
    errs = []
    for fn in (fused, eager_gn):
        xg.grad = w.grad = b.grad = None
        out = fn(xg, w, b) if fn is eager_gn else fn(xg)
        out.backward(grad)
        errs.append((out.detach(), xg.grad.clone(), w.grad.clone(), b.grad.clone()))
    err = max(rel_err(a, e) for a, e in zip(*errs))

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def fwd_bwd(fn):
        def run():
            xg.grad = w.grad = b.grad = None
            fn().backward(grad)
        return run

    res = torch.randn_like(x)
    methods = {
        "fused fwd": fwd(lambda: fused(x)), "eager fwd": fwd(lambda: eager_gn(x, w, b)),
        "fused fwd+res": fwd(lambda: gn.leaky_relu_group_norm(x, w, b, 1, residual=res, backend=backend)),
        "eager fwd+res": fwd(lambda: eager_gn(x, w, b) + res),
        "fused fwd+bwd": fwd_bwd(lambda: fused(xg)), "eager fwd+bwd": fwd_bwd(lambda: eager_gn(xg, w, b)),
    }
    times = interleaved(blocks(methods, inner), repeats=repeats, device=device)
    return err, per_call(times, inner)


def head_case(shape, device, backend, repeats, inner):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(shape, generator=g) * 2).to(device)
    beta = (torch.rand(shape[1], generator=g) + 0.5).to(device).requires_grad_()
    hg = h.clone().requires_grad_()
    grads = [torch.randn(s, generator=g).to(device) for s in (shape, (*shape[:2], 2), shape[:2], shape[:2])]

    def loss(outs):
        return sum((o * gr).sum() for o, gr in zip(outs, grads))

    def head(t, beta):
        hm = hmo.softargmax_heatmaps(t, beta, backend=backend)
        return (hm, *hmo.heatmap_keypoints(hm, backend=backend))

    def head_ref(t, beta):
        hm = hmo.softargmax_heatmaps_ref(t, beta)
        return (hm, *hmo.heatmap_keypoints_ref(hm))

    errs = []
    for fn in (lambda t: head(t, beta), lambda t: head_ref(t, beta)):
        hg.grad = beta.grad = None
        outs = fn(hg)
        loss(outs).backward()
        errs.append([o.detach() for o in outs] + [hg.grad.clone(), beta.grad.clone()])
    err = max(rel_err(a, e) for a, e in zip(*errs))

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def fwd_bwd(fn):
        def run():
            hg.grad = beta.grad = None
            loss(fn()).backward()
        return run

    methods = {
        "fused fwd": fwd(lambda: head(h, beta)),
        "eager fwd": fwd(lambda: head_ref(h, beta)),
        "fused fwd+bwd": fwd_bwd(lambda: head(hg, beta)),
        "eager fwd+bwd": fwd_bwd(lambda: head_ref(hg, beta)),
        "fused softargmax fwd": fwd(lambda: hmo.softargmax_heatmaps(h, beta, backend=backend)),
        "eager softargmax fwd": fwd(lambda: hmo.softargmax_heatmaps_ref(h, beta)),
    }
    times = interleaved(blocks(methods, inner), repeats=repeats, device=device)
    return err, per_call(times, inner)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write results here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, help="fused backend (default: auto, i.e. cpp on CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="back-to-back calls per timing")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    probe = torch.empty(0, device=args.device)
    backend = resolve("leaky_relu_group_norm", probe, args.backend)
    if backend == "torch":
        print("no fused backend available on this device: nothing to compare", file=sys.stderr)
        return 1

    rows, results, bad = [], [], []
    for shape in (QUICK_GN_SHAPES if args.quick else GN_SHAPES):
        for cl in (False, True):
            err, t = gn_case(shape, cl, args.device, backend, repeats, args.inner)
            case = {"op": "leaky_relu_group_norm", "shape": list(shape), "layout": "channels_last" if cl else "nchw",
                    "max_rel_err": err, "ms": t}
            results.append(case)
            bad += [case] if err > AGREEMENT else []
            for kind in ("fwd", "fwd+bwd", "fwd+res"):
                f, e = t[f"fused {kind}"]["median"], t[f"eager {kind}"]["median"]
                rows.append({"op": "lrelu_gn", "shape": "x".join(map(str, shape)), "layout": case["layout"],
                             "pass": kind, "fused_ms": f, "eager_ms": e, "speedup": e / f, "rel_err": err})
    for shape in (QUICK_HEAD_SHAPES if args.quick else HEAD_SHAPES):
        err, t = head_case(shape, args.device, backend, repeats, args.inner)
        case = {"op": "softargmax_heatmaps+heatmap_keypoints", "shape": list(shape), "max_rel_err": err, "ms": t}
        results.append(case)
        bad += [case] if err > AGREEMENT else []
        for kind in ("fwd", "fwd+bwd", "softargmax fwd"):
            f, e = t[f"fused {kind}"]["median"], t[f"eager {kind}"]["median"]
            rows.append({"op": "heatmap head" if kind != "softargmax fwd" else "softargmax",
                         "shape": "x".join(map(str, shape)), "layout": "nchw", "pass": kind.split()[-1],
                         "fused_ms": f, "eager_ms": e, "speedup": e / f, "rel_err": err})

    print(table(rows, ["op", "shape", "layout", "pass", "fused_ms", "eager_ms", "speedup", "rel_err"]))
    info = machine_info(args.device)
    print(f"\nbackend={backend} device={args.device} threads={torch.get_num_threads()} repeats={repeats} "
          f"inner={args.inner} "
          f"load before={info.get('load_average_before')}")
    write_json(args.json, {"machine": info, "backend": backend, "repeats": repeats, "inner": args.inner,
                           "quick": args.quick, "rows": rows, "results": results})
    if bad:
        print(f"fused and eager results disagree (> {AGREEMENT} relative): {bad}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
