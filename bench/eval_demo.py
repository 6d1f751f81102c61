"""Accuracy of the shipped demo model on the held-out test split its training config evaluates (the README's
"Synthetic hard test stills" figures): NME, FR@0.1, AUC@0.1 (inter-ocular) and solver iterations.

    python bench/eval_demo.py --json bench/results/demo_model_nme_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from common import machine_info, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    from ldeq_fast.model.weights import load_weights
    from ldeq_fast.train import TrainConfig, build_dataset, evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(ROOT, "ldeq_fast", "assets", "demo_synthetic.pt"))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo_synthetic.json"),
                   help="the training config whose evaluation split is used")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cfg = TrainConfig.from_dict(json.load(open(a.config)))
    model = load_weights(a.model).to(a.device).eval()
    data = build_dataset(cfg, a.split, False, model.cfg.im_size)
    with torch.no_grad():
        r = evaluate(model, data, cfg.eval_batch_size, a.device)
    res = {"machine": machine_info(a.device), "model": os.path.relpath(a.model, ROOT), "config": a.config,
           "split": a.split, "images": len(data), "difficulty": cfg.synthetic_difficulty, **r}
    print(f"{res['model']} on {len(data)} {cfg.synthetic_difficulty} synthetic {a.split} stills: "
          f"NME {100 * r['nme']:.2f}%  FR@0.1 {100 * r['fr']:.2f}%  AUC@0.1 {r['auc']:.3f}  iters {r['iters']:.2f}")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
