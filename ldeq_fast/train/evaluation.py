"""Evaluation of a model on a landmark dataset: NME / FR / AUC and solver iterations."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ldeq_fast import metrics
from ldeq_fast.model.ldeq import LDEQ
from ldeq_fast.train.data import collate


@torch.no_grad()
def evaluate(model: LDEQ, dataset, batch_size: int = 32, device="cpu") -> dict:
    """NME / FR@0.1 / AUC@0.1 (inter-ocular) and mean solver iterations on a dataset."""
    was_training = model.training
    model.eval()
    preds, gts, iters = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for b in loader:
        out = model(b["image"].to(device))
        preds.append(out.keypoints.float().cpu())
        gts.append(b["kpts"])
        iters.append(out.stats.nstep.float().cpu() if out.stats is not None else torch.zeros(len(b["kpts"])))
    model.train(was_training)
    nme, fr, auc = metrics.nme_fr_auc(torch.cat(preds), torch.cat(gts))
    return {"nme": nme, "fr": fr, "auc": auc, "iters": float(torch.cat(iters).mean()), "n": len(dataset)}
