"""``ldeq-fast train``: train LDEQ (synthetic faces by default, or WFLW); under torchrun, data parallel."""
from __future__ import annotations

import argparse
import os

NAME = "train"
HELP = "train LDEQ (synthetic faces by default, or WFLW); torchrun for DDP"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override fields, e.g. steps=200 model_preset=small model.max_iters=6")
    p.add_argument("--out", default=None, help="output folder (TrainConfig.out_dir)")
    p.add_argument("--device", default=None)


def run(a) -> int:
    from ldeq_fast.train import config_from_sources, train

    res = train(config_from_sources(a.config, a.set, a.out), a.device)
    if int(os.environ.get("RANK", "0")) == 0:
        for split, r in res.items():
            print(f"{split}: NME {100 * r['nme']:.2f}%  FR@0.1 {100 * r['fr']:.2f}%  AUC@0.1 {r['auc']:.4f}  "
                  f"iters {r['iters']:.1f}  (n={r['n']})")
    return 0
