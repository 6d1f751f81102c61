"""Accuracy of the shipped demo model on the held-out test split its training config evaluates (the demo-model
table of docs/video.md): NME, FR@0.1, AUC@0.1 (inter-ocular) and solver iterations, as loaded
(with the learned initial state beside the model when there is one) and, side by side, from zeros.

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
    models = {"as_loaded": load_weights(a.model)}
    if models["as_loaded"].initial_state is not None:
        models["zeros"] = load_weights(a.model, init=None)
    data = build_dataset(cfg, a.split, False, models["as_loaded"].cfg.im_size)
    runs = {}
    for name, model in models.items():
        with torch.no_grad():
            runs[name] = evaluate(model.to(a.device).eval(), data, cfg.eval_batch_size, a.device)
    r = runs["as_loaded"]
    res = {"machine": machine_info(a.device), "model": os.path.relpath(a.model, ROOT), "config": a.config,
           "split": a.split, "images": len(data), "difficulty": cfg.synthetic_difficulty,
           "initial_state": getattr(models["as_loaded"], "initial_state_info", None), **r, "runs": runs}
    for name, rr in runs.items():
        print(f"{res['model']} ({name}) on {len(data)} {cfg.synthetic_difficulty} synthetic {a.split} stills: "
              f"NME {100 * rr['nme']:.2f}%  FR@0.1 {100 * rr['fr']:.2f}%  AUC@0.1 {rr['auc']:.3f}  "
              f"iters {rr['iters']:.2f}")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
