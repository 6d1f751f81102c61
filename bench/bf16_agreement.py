"""bf16 autocast vs fp32 on a trained model: keypoint agreement in heatmap pixels and accuracy, same images.

Random weights do not converge, so their bf16/fp32 differences say nothing; the shipped demo model (trained on
synthetic faces) does.  On CPU this needs bf16 convolutions (AVX-512 BF16 / AMX make them fast); on a GPU
pass --device cuda.

    python bench/bf16_agreement.py --json bench/results/bf16_agreement_cpu.json
"""
from __future__ import annotations

import argparse
import sys

import torch
from common import machine_info, write_json


def main(argv=None) -> int:
    from ldeq_fast.data.synthetic import SyntheticFaces
    from ldeq_fast.model import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    from ldeq_fast.numerics import native_bf16

    if not native_bf16(device.type):   # a bf16 conv there is ~200x slower, and the model runs fp32 anyway
        why = (f"no native bf16 on this {device.type} (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False): "
               "the bf16 comparison is skipped")
        print(f"skipped: {why}")
        write_json(a.json, {"machine": machine_info(device), "device": str(device), "skipped": why})
        return 0
    model = load_model(a.model).to(device).eval()
    faces = SyntheticFaces(a.images, size=model.cfg.im_size, seed=123, difficulty="hard")
    images = torch.stack([faces[i]["image"] for i in range(a.images)]).to(device)
    truth = torch.stack([faces[i]["kpts"] for i in range(a.images)]).to(device)
    with torch.no_grad():
        fp32 = model(images).keypoints
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = model(images).keypoints
    px = model.cfg.heatmap_size
    diff = ((bf16 - fp32).abs() * px).flatten()
    res = {"machine": machine_info(device), "device": str(device), "model": a.model, "images": a.images,
           "bf16_vs_fp32_px": {"max": float(diff.max()), "mean": float(diff.mean()),
                               "p99": float(diff.quantile(0.99))},
           "mean_error_px": {"fp32": float((fp32 - truth).norm(dim=-1).mean() * px),
                             "bf16": float((bf16 - truth).norm(dim=-1).mean() * px)}}
    d, e = res["bf16_vs_fp32_px"], res["mean_error_px"]
    print(f"bf16 vs fp32 keypoints (heatmap px): max {d['max']:.4f}, p99 {d['p99']:.4f}, mean {d['mean']:.4f}; "
          f"mean landmark error fp32 {e['fp32']:.4f} px, bf16 {e['bf16']:.4f} px")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
