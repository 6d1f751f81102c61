"""A 1x1 convolution followed by an add, as the fast path's split convs and injection term use it on CPU: conv then
add, oneDNN's conv with an add post-op, and its in-place form (written into the add operand), channels_last,
interleaved, medians.

    python bench/bench_conv_add.py --json bench/results/conv_add_cpu.json
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from common import interleaved, machine_info, summary, write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8,224,64,64", help="N,C,H,W of the input (C in = C out)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    N, C, H, W = (int(v) for v in a.shape.split(","))
    cl = torch.channels_last
    x = torch.randn(N, C, H, W).contiguous(memory_format=cl)
    w = torch.randn(C, C, 1, 1).contiguous(memory_format=cl) / C ** 0.5
    other = torch.randn(N, C, H, W).contiguous(memory_format=cl)
    target = other.clone()
    pointwise = torch.ops.mkldnn._convolution_pointwise
    args = (w, None, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None)
    want = F.conv2d(x, w) + other
    got = pointwise.binary(x, other, *args)
    err = float((got - want).abs().max() / want.abs().max())

    def in_place():
        target.copy_(other)  # the in-place form consumes its operand; the copy is timed alone below
        torch.ops.mkldnn._convolution_pointwise_.binary(target, x, *args)

    with torch.no_grad():
        times = interleaved({"conv + add": lambda: F.conv2d(x, w) + other,
                             "conv with add post-op": lambda: pointwise.binary(x, other, *args),
                             "in-place post-op (+ operand copy)": in_place,
                             "operand copy alone": lambda: target.copy_(other)}, repeats=a.repeats)
    ms = {k: summary(v, 1e3) for k, v in times.items()}
    med = {k: v["median"] for k, v in ms.items()}
    med["in-place post-op"] = med["in-place post-op (+ operand copy)"] - med["operand copy alone"]
    for k, v in med.items():
        print(f"{k:<36} {v:8.2f} ms")
    write_json(a.json, {"machine": machine_info(), "shape": [N, C, H, W], "layout": "channels_last",
                        "repeats": a.repeats, "max_rel_err_post_op": err, "ms": ms, "median_ms": med})
    return 0 if err < 1e-4 else 2


if __name__ == "__main__":
    sys.exit(main())
