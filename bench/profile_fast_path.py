"""Where the fast path's inference time goes: the share of convolutions in one forward of the default model.

The torch profiler attributes self time to each op; the convolutions' time is set against the total, for the
fast path and the reference path (and on CUDA the fast path under bf16 autocast), with the same weights and
images: on CPU the self time of the convolution ops, on CUDA the device time of the kernels under
aten::convolution against all kernels' device time.  The fast path's goal is a forward that is convolutions
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
from torch.profiler import ProfilerActivity, profile


def is_conv(name: str) -> bool:
    return "conv" in name.lower()


def profile_forward(model, images, device, autocast_dtype=None) -> dict:
    """Self time per op of one forward.  CPU: an op's self time is its work, and the convolution ops
    (aten::mkldnn_convolution, mkldnn::_convolution_pointwise, ...) are found by name.  CUDA: the kernels
    carry the device time and cuDNN's kernel names need not say "conv", so a convolution's share is the
    inclusive device time of the aten::convolution ops (every F.conv2d passes through one)."""
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
    conv = 0.0
    for e in prof.key_averages():
        by_op[e.key] += e.self_device_time_total if cuda else e.self_cpu_time_total
        if cuda and e.key == "aten::convolution":
            conv += e.device_time_total
    total = sum(by_op.values())
    if not cuda:
        conv = sum(t for k, t in by_op.items() if is_conv(k))
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"total_ms": total / 1e3, "conv_ms": conv / 1e3, "conv_share": conv / total if total else None,
            "iterations": float(out.stats.nstep.float().mean()),
            "top_ops_ms": [(k, t / 1e3) for k, t in top]}


def main(argv=None) -> int:
    from ldeq_fast import LDEQ, LDEQConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--small", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    cfg = LDEQConfig.small() if a.small else LDEQConfig()
    model = LDEQ(cfg).to(device).eval()
    images = torch.randn(a.batch, 3, cfg.im_size, cfg.im_size, device=device)
    res = {"machine": machine_info(device), "device": str(device), "batch": a.batch, "small": a.small,
           "paths": {}}
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
