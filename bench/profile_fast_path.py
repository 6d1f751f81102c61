"""Where the fast path's inference time goes: the share of convolutions in one forward of the default model.

The torch profiler attributes self time to each op; the convolutions' time is set against the total, for the
fast path and the reference path (and on CUDA the fast path under bf16 autocast), with the same weights and
images: on CPU the self time of the convolution ops plus the whole time of the Winograd convolutions the CPU
plan picked (ldeq_fast/model/winograd.py: GEMMs and tile transforms under one profiler scope), on CUDA the device time of the kernels under
aten::convolution against the summed device time of all kernel rows (the operator and runtime rows would count
the same kernels twice more).  The fast path's goal is a forward that is convolutions
and next to nothing else.

    python bench/profile_fast_path.py --batch 8 --json bench/results/profile_cpu_b8.json
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict

import torch
from common import machine_info, write_json
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def is_conv(name: str) -> bool:
    return "conv" in name.lower()


def profile_forward(model, images, device, autocast_dtype=None) -> dict:
    """Time per op of one forward.  CPU: each op's self time is its work, and the convolution ops
    (aten::mkldnn_convolution, mkldnn::_convolution_pointwise, ...) are found by name.  CUDA: the device
    kernels alone carry the time -- the operator rows (aten::*) and the runtime rows (cudaLaunchKernel, ...)
    report the same kernels' time again, so the total is the sum over kernel events only; a kernel is a
    convolution's when an aten::convolution op launched it (cuDNN's kernel names need not say "conv")."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:
        model(images, max_iters=1)                       # warm-up: oneDNN primitives, kernel caches
        with profile(activities=acts) as prof:
            out = model(images)
            if cuda:
                torch.cuda.synchronize()
    by_op: dict[str, float] = defaultdict(float)
    if cuda:
        events = prof.events()
        for e in events:
            if e.device_type != DeviceType.CPU:          # a kernel, memcpy or memset on the device
                by_op[e.name] += e.device_time_total
        # inclusive device time of each aten::convolution = the kernels it (and its callees) launched
        conv = sum(e.device_time_total for e in events
                   if e.device_type == DeviceType.CPU and e.name == "aten::convolution")
    else:
        from ldeq_fast.model.winograd import PROFILE_NAME

        winograd = 0.0
        for e in prof.key_averages():
            by_op[e.key] += e.self_cpu_time_total
            if e.key == PROFILE_NAME:   # Winograd convolutions: their GEMMs and tile transforms, inclusive
                winograd += e.cpu_time_total
        conv = winograd + sum(t for k, t in by_op.items() if is_conv(k) and k != PROFILE_NAME)
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"total_ms": total / 1e3, "conv_ms": conv / 1e3, "conv_share": conv / total if total else None,
            "winograd_conv_ms": None if cuda else winograd / 1e3,
            "time_rows": "device kernels only" if cuda else "operator self CPU time",
            "iterations": float(out.stats.nstep.float().mean()), "backends": out.backends,
            "top_ops_ms": [(k, t / 1e3) for k, t in top]}


def main(argv=None) -> int:
    from ldeq_fast import LDEQ, LDEQConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--small", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="'demo' or an ldeq_fast .pt (with its learned init when it has "
                   "one) instead of the random-weight default model")
    p.add_argument("--solver", default=None, help="solve with this method (then with tolerance 0: a fixed budget)")
    p.add_argument("--max-iters", type=int, default=None, help="iterations (then with tolerance 0)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    if a.model:
        from ldeq_fast.video.cli import load_model

        model = load_model(a.model).to(device).eval()
        cfg = model.cfg
    else:
        cfg = LDEQConfig.small() if a.small else LDEQConfig()
        model = LDEQ(cfg).to(device).eval()
    over = {k: v for k, v in (("solver", a.solver), ("max_iters", a.max_iters)) if v is not None}
    if over:   # e.g. the equal-accuracy setting of bench --accuracy: a fixed budget
        cfg = cfg.replace(**over, rel_tol=0.0, abs_tol=0.0)
    images = torch.randn(a.batch, 3, cfg.im_size, cfg.im_size, device=device)
    res = {"machine": machine_info(device), "device": str(device), "batch": a.batch, "small": a.small,
           "model": a.model or "random weights", "solver_overrides": over,
           "learned_init": getattr(model, "initial_state", None) is not None, "paths": {}}
    paths = [("reference", "torch", None), ("fast", "auto", None)]
    if device.type == "cuda":
        paths.append(("fast_bf16", "auto", torch.bfloat16))  # the GPU recipe: bf16 autocast
    for name, backend, amp_dtype in paths:
        model.cfg = cfg.replace(backend=backend)
        r = profile_forward(model, images, device, amp_dtype)
        res["paths"][name] = r
        print(f"{name:>9}: {r['total_ms']:.0f} ms {'device' if device.type == 'cuda' else 'op self'} time, convolutions {r['conv_ms']:.0f} ms "
              f"({100 * r['conv_share']:.1f}%), {r['iterations']:.1f} iterations")
        for k, t in r["top_ops_ms"][:8]:
            print(f"{'':>11}{t:9.1f} ms  {k}")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
