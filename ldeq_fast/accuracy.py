"""Accuracy per cell evaluation (``ldeq-fast bench --accuracy``).

The error against the converged answer as a function of the cell evaluations spent, for fixed-point
iteration and Anderson, each from zeros (the published start) and from the learned initial state
(ldeq_fast/model/init_state.py).  Every point is the model's own inference with one setting:

* E >= 2 evaluations: ``max_iters = E - 1`` solver evaluations (tolerance 0) and the extra step;
* E = 1: one solver evaluation without the extra step (``take_one_less_inference_step``);
* the learned init adds its own cost in cell evaluations (FLOP ratio; the measured time ratio is reported
  beside it), so its points sit at E + cost.

Errors: the NME against the labels when the data has them, and always the keypoint distance to the
converged solution (``converged_iters`` solver iterations from zeros, tolerance 0, plus the extra step),
normalised like the NME (inter-ocular distance of the converged keypoints).  ``recommend`` picks the
cheapest setting within a given error.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from ldeq_fast import metrics

EVALS = (1, 2, 3, 4, 5, 7, 11, 21)
METHODS = ("fpi", "anderson")
CONVERGED_ITERS = 50
# synthetic seeds, disjoint from each other and from training's (ldeq_fast.train: seed 0 for the training
# stills, 10000 + crc32(split) % 1000 for its evaluation splits): item i of seed s is rendered from (s, i)
HELD_OUT_SEED = 4_000_037   # the accuracy bench's held-out stills
FIT_SEED = 2_000_003        # fit-init's synthetic faces


def nme_normaliser(kpts: torch.Tensor) -> torch.Tensor:
    """(N,) the NME normaliser of keypoints (N, K, 2): the inter-ocular distance for the 98- and 68-point
    layouts, the square root of the keypoint box area otherwise."""
    k = kpts.shape[1]
    if k in metrics.INTEROCULAR:
        a, b = metrics.INTEROCULAR[k]
        return (kpts[:, a] - kpts[:, b]).norm(dim=-1)
    span = kpts.amax(dim=1) - kpts.amin(dim=1)
    return (span[:, 0] * span[:, 1]).clamp_min(0).sqrt()


def distance_to(kpts: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N,) mean keypoint distance to ``reference`` over its face scale (an NME against the reference)."""
    return (kpts - reference).norm(dim=-1).mean(dim=-1) / nme_normaliser(reference).clamp_min(1e-12)


def setting_for(evals: int, method: str) -> dict:
    """The config overrides that spend ``evals`` cell evaluations (the extra step included)."""
    if evals < 1:
        raise ValueError(f"evaluations must be >= 1, got {evals}")
    if evals == 1:
        return {"solver": method, "max_iters": 1, "take_one_less_inference_step": True}
    return {"solver": method, "max_iters": evals - 1, "take_one_less_inference_step": False}


@torch.no_grad()
def predict(model, images: torch.Tensor, overrides: dict, init: bool, batch: int = 64, bar=None) -> torch.Tensor:
    """Keypoints of ``model`` run with config ``overrides`` (tolerance 0), from the learned init or zeros."""
    cfg = model.cfg
    h = model.initial_state
    model.cfg = cfg.replace(**overrides, rel_tol=0.0, abs_tol=0.0, stochastic_max_iters=False)
    if not init:
        model.set_initial_state(None)
    elif h is None:
        raise ValueError("init=True needs a model with a learned initial state attached")
    try:
        device = next(model.parameters()).device
        out = []
        for i in range(0, len(images), batch):
            out.append(model(images[i:i + batch].to(device)).keypoints.float().cpu())
            if bar is not None:
                bar.update(len(images[i:i + batch]))
        return torch.cat(out)
    finally:
        model.cfg = cfg
        if h is not None and model.initial_state is None:
            info = getattr(model, "initial_state_info", None)
            model.set_initial_state(h)
            if info is not None:
                model.initial_state_info = info


def converged_keypoints(model, images: torch.Tensor, iters: int = CONVERGED_ITERS, batch: int = 64,
                        bar=None) -> torch.Tensor:
    """The converged answer: ``iters`` iterations of the model's solver from zeros (tolerance 0), the extra step."""
    return predict(model, images, {"max_iters": int(iters), "take_one_less_inference_step": False}, init=False,
                   batch=batch, bar=bar)


def _time_ratio(model, images: torch.Tensor, batch: int, repeats: int = 7) -> float:
    """Measured time of h(x) (+ the output norm) over one cell evaluation at ``batch``, interleaved, median."""
    x = model.injection(images[:batch].to(next(model.parameters()).device))
    f = model.cell_fn(x)
    z = model.initial_z0(x)
    ratios = []
    for rep in range(repeats + 1):
        t0 = time.perf_counter()
        model.initial_z0(x)
        t1 = time.perf_counter()
        f(z)
        t2 = time.perf_counter()
        if rep:
            ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


@torch.no_grad()
def init_cost(model, images: torch.Tensor) -> dict:
    """The learned init's cost in cell evaluations: FLOP ratio, and measured time ratios at batch 1 and 8."""
    from ldeq_fast.model.init_state import init_cost_flops

    cost = init_cost_flops(model)
    was = model.training
    model.eval()
    try:
        cost["time_ratio"] = {str(b): _time_ratio(model, images, b) for b in (1, min(8, len(images)))}
    finally:
        model.train(was)
    return cost


def run_accuracy(model, images: torch.Tensor, labels: torch.Tensor | None = None, evals=EVALS, methods=METHODS,
                 converged_iters: int = CONVERGED_ITERS, batch: int = 64, progress: bool = True) -> dict:
    """The error-vs-evaluations curves (see the module docstring).  ``labels`` (N, K, 2) in [0, 1), optional."""
    evals = sorted({int(e) for e in evals})
    use_init = model.initial_state is not None
    n = len(images)
    total = n * (1 + len(evals) * len(methods) * (2 if use_init else 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="accuracy per evaluation", unit="image", leave=False)
    res = {"images": n, "labels": labels is not None, "evals": evals, "converged_iters": converged_iters,
           "converged_solver": model.cfg.solver, "curves": []}
    try:
        conv = converged_keypoints(model, images, converged_iters, batch, bar)
        if labels is not None:
            res["converged_nme"] = float(metrics.nme_per_image(conv, labels).mean())
        cost = init_cost(model, images) if use_init else None
        res["init_cost"] = cost
        for method in methods:
            for init in ((False, True) if use_init else (False,)):
                curve = {"method": method, "z0": "learned" if init else "zeros",
                         "init_cost_evals": cost["ratio"] if init else 0.0, "points": []}
                for e in evals:
                    kp = predict(model, images, setting_for(e, method), init, batch, bar)
                    pt = {"evals": e, "cost_evals": e + curve["init_cost_evals"], "setting": setting_for(e, method),
                          "vs_converged": float(distance_to(kp, conv).mean())}
                    if labels is not None:
                        pt["nme"] = float(metrics.nme_per_image(kp, labels).mean())
                    curve["points"].append(pt)
                res["curves"].append(curve)
        if use_init:
            with torch.no_grad():   # the init's own keypoints (no cell evaluation)
                x = torch.cat([model.injection(images[i:i + batch].to(next(model.parameters()).device)).cpu()
                               for i in range(0, n, batch)])
                kp0 = model.read_out(model.initial_z0(x)).keypoints.float()
            res["init_alone"] = {"cost_evals": cost["ratio"], "vs_converged": float(distance_to(kp0, conv).mean())}
            if labels is not None:
                res["init_alone"]["nme"] = float(metrics.nme_per_image(kp0, labels).mean())
    finally:
        if bar is not None:
            bar.close()
    return res


def recommend(res: dict, within_pct: float = 1.0) -> dict | None:
    """The cheapest point within the error budget: with labels, NME <= (1 + within_pct/100) x the converged
    NME; without, the distance to the converged answer <= within_pct % (NME units).  None if no point is."""
    if res["labels"]:
        limit, key = res["converged_nme"] * (1 + within_pct / 100), "nme"
        rule = f"NME within {within_pct:g}% of the converged NME ({100 * res['converged_nme']:.3f}%)"
    else:
        limit, key = within_pct / 100, "vs_converged"
        rule = f"distance to the converged answer <= {within_pct:g}% (NME units)"
    ok = [(p["cost_evals"], p[key], c["method"], c, p) for c in res["curves"] for p in c["points"] if p[key] <= limit]
    if not ok:
        return {"rule": rule, "limit": limit, "setting": None}
    _, _, _, c, p = min(ok, key=lambda t: t[:3])   # ties in cost: the lower error
    return {"rule": rule, "limit": limit, "method": c["method"], "z0": c["z0"], "evals": p["evals"],
            "cost_evals": p["cost_evals"], key: p[key], "setting": p["setting"]}


def format_accuracy(res: dict) -> str:
    key = "nme" if res["labels"] else "vs_converged"
    head = "NME %" if res["labels"] else "distance to converged, NME %"
    lines = [f"accuracy per cell evaluation: {res['images']} images, {head} (converged: {res['converged_iters']} "
             f"{res['converged_solver']} iterations"
             + (f", NME {100 * res['converged_nme']:.3f}%)" if res["labels"] else ")")]
    lines.append(f"{'method':<9} {'z0':<8} " + " ".join(f"{e:>7}" for e in res["evals"]))
    for c in res["curves"]:
        lines.append(f"{c['method']:<9} {c['z0']:<8} " + " ".join(f"{100 * p[key]:>7.3f}" for p in c["points"]))
    if res.get("init_cost"):
        ic = res["init_cost"]
        tr = ", ".join(f"batch {b}: {r:.3f}" for b, r in ic["time_ratio"].items())
        lines.append(f"learned init cost: {ic['ratio']:.3f} cell evaluations in FLOPs ({ic['init_flops'] / 1e6:.2f} vs "
                     f"{ic['cell_flops'] / 1e6:.1f} MFLOP per image); measured time ratio {tr}")
        a = res["init_alone"]
        lines.append(f"learned init alone (no cell evaluation): {100 * a[key]:.3f}")
    rec = res.get("recommendation")
    if rec:
        if rec["setting"] is None:
            lines.append(f"recommendation: no setting measured meets {rec['rule']}")
        else:
            lines.append(f"recommendation ({rec['rule']}): {rec['method']} from {rec['z0']} z0, {rec['evals']} cell "
                         f"evaluations (cost {rec['cost_evals']:.2f}): {rec['setting']}")
    return "\n".join(lines)


def plot_accuracy(res: dict, path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "nme" if res["labels"] else "vs_converged"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {("fpi", "zeros"): ("C0", "o", "--"), ("anderson", "zeros"): ("C1", "s", "--"),
              ("fpi", "learned"): ("C0", "o", "-"), ("anderson", "learned"): ("C1", "s", "-")}
    for c in res["curves"]:
        color, marker, ls = styles.get((c["method"], c["z0"]), ("C2", "^", "-"))
        xs = [p["cost_evals"] for p in c["points"]]
        ys = [100 * p[key] for p in c["points"]]
        ax.plot(xs, ys, color=color, marker=marker, ls=ls, ms=4, label=f"{c['method']}, z0 = {c['z0']}")
    if res["labels"]:
        conv = 100 * res["converged_nme"]
        ax.axhline(conv, color="k", lw=0.8, label=f"converged ({res['converged_iters']} iterations)")
        ax.axhspan(conv, conv * 1.01, color="k", alpha=0.08, label="within 1% of converged")
    ax.set_xscale("log")
    ticks = res["evals"]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("cell evaluations (extra step and learned init's cost included)")
    ax.set_ylabel("NME % (labels)" if res["labels"] else "distance to converged answer, NME %")
    ax.set_title(title or f"accuracy per cell evaluation ({res['images']} images)")
    finite = [100 * p[key] for c in res["curves"] for p in c["points"] if np.isfinite(p[key])]
    if finite:
        lo, hi = min(finite), sorted(finite)[int(0.9 * (len(finite) - 1))]
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9) - (0 if res["labels"] else lo), hi + 0.35 * (hi - lo + 1e-9))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
