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
    ta = res.get("time_to_accuracy")
    if ta:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.4, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    else:
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
    if ta:
        _plot_time_to_accuracy(bx, ta)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- equal accuracy
EQUAL_ACCURACY_PATHS = ("reference", "published", "fast", "onnxruntime", "openvino")
TIMING_BATCHES = (1, 8)


def _path_curves(res: dict, path: str, use_init: bool) -> list[dict]:
    """The curves a path may pick its setting from: fast and reference any solver and start; published the
    published code's zeros start; the ONNX peers fixed-point iterations from the start the export has (the
    learned initial state when attached)."""
    cs = res["curves"]
    if path in ("fast", "reference"):
        return cs
    if path == "published":
        return [c for c in cs if c["z0"] == "zeros"]
    return [c for c in cs if c["method"] == "fpi" and c["z0"] == ("learned" if use_init else "zeros")]


class _Candidate:
    """One path at one setting: a callable images -> keypoints and what it is."""

    def __init__(self, path, curve, point, call, what):
        self.path, self.curve, self.point, self.call, self.what = path, curve, point, call, what
        self.key = f"{path}:{curve['method']}/{curve['z0']}/{point['evals']}"


def _model_at(model, path: str, setting: dict, init: bool):
    import copy

    m = copy.deepcopy(model).eval()
    over = {"backend": "torch"} if path in ("reference", "published") else {}
    if path == "published":
        over["solver_semantics"] = "published"
    m.cfg = model.cfg.replace(**setting, **over, rel_tol=0.0, abs_tol=0.0, stochastic_max_iters=False)
    if not init:
        m.set_initial_state(None)
    return m


def _candidate(path, curve, point, model, tmpdir):
    from ldeq_fast import peers

    init = curve["z0"] == "learned"
    if path in peers.ONNX_PEERS:
        m = _model_at(model, "reference", point["setting"], init)
        f = f"{tmpdir}/{curve['method']}_{curve['z0']}_{point['evals']}.onnx"
        iters = point["setting"]["max_iters"]
        export = peers.export_for_peers(m, f, iters)
        peer = peers.OnnxPeer(path, f)
        return _Candidate(path, curve, point, peer, {"export": export, **peer.info()})
    m = _model_at(model, path, point["setting"], init)

    def call(x, m=m):
        return m(x).keypoints

    return _Candidate(path, curve, point, call, {"backend": m.cfg.backend, "semantics": m.cfg.solver_semantics})


@torch.no_grad()
def _predict_all(call, images: torch.Tensor, device, batch: int) -> torch.Tensor:
    return torch.cat([call(images[i:i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)])


def time_to_accuracy(model, images: torch.Tensor, labels: torch.Tensor | None, res: dict, within_pct: float = 1.0,
                     paths=None, batches=TIMING_BATCHES, repeats: int = 5, batch: int = 64,
                     progress: bool = True) -> dict:
    """Time per image to come within ``within_pct`` of the converged error (``recommend``'s rule), each path
    at its cheapest setting that gets there.

    Per path, per allowed curve (``_path_curves``), the fewest cell evaluations the curve puts within the
    limit; that setting is then run on this path over all the images and its own error checked (the next
    evaluation count if it misses: a peer rounds differently).  Every candidate that gets there is timed at
    each batch size, interleaved with the others, the order rotated each repeat, median; a path's figure is
    its fastest candidate.  Peers that are not installed are skipped and said so.
    """
    import tempfile

    from ldeq_fast import peers
    from ldeq_fast.benchmark import SETTLE_S, path_order, settle

    paths = EQUAL_ACCURACY_PATHS if paths is None else tuple(paths)
    unknown = sorted(set(paths) - set(EQUAL_ACCURACY_PATHS))
    if unknown:
        raise ValueError(f"unknown path(s) {unknown} for the equal-accuracy timing; available: "
                         f"{list(EQUAL_ACCURACY_PATHS)}")
    rec = recommend(res, within_pct)
    key = "nme" if res["labels"] else "vs_converged"
    device = next(model.parameters()).device
    use_init = model.initial_state is not None
    conv = None if labels is not None else converged_keypoints(model, images, res["converged_iters"], batch)
    out = {"rule": rec["rule"], "limit": rec["limit"], "error": key, "batches": list(batches), "repeats": repeats,
           "order": "rotated by one candidate each repeat", "settle_s": SETTLE_S, "skipped": [], "candidates": [], "paths": {}}
    from ldeq_fast import _ext

    for p in paths:
        why = peers.missing_reason(p) if p in peers.ONNX_PEERS else None
        if p == "fast" and device.type == "cpu" and not _ext.has_cpp():
            why = _ext.missing_reason()
        if why:
            out["skipped"].append({"path": p, "why": why})
    paths = [p for p in paths if p not in {s["path"] for s in out["skipped"]}]
    tmp = tempfile.TemporaryDirectory(prefix="ldeq_fast_accuracy_")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="time to accuracy", unit="run", leave=False)
    try:
        cands = []
        for p in paths:
            for curve in _path_curves(res, p, use_init):
                pts = sorted(curve["points"], key=lambda q: q["evals"])
                start = next((i for i, q in enumerate(pts) if q[key] <= rec["limit"]), None)
                if start is None:
                    continue
                for q in pts[start:]:          # the curve's first point within; later ones if this path misses
                    c = _candidate(p, curve, q, model, tmp.name)
                    kp = _predict_all(c.call, images, device, batch)
                    err = float(metrics.nme_per_image(kp, labels).mean() if labels is not None
                                else distance_to(kp, conv).mean())
                    entry = {"path": p, "method": curve["method"], "z0": curve["z0"], "evals": q["evals"],
                             "cost_evals": q["cost_evals"], "setting": q["setting"], key: err,
                             "within": err <= rec["limit"], "ran": c.what}
                    out["candidates"].append(entry)
                    if bar is not None:
                        bar.update(1)
                    if entry["within"]:
                        c.entry = entry
                        cands.append(c)
                        break
        for bs in batches:
            x = images[:bs].to(device)
            times = {c.key: [] for c in cands}
            for rep in range(repeats + 1):           # rep 0: warm-up
                for k in path_order([c.key for c in cands], rep):
                    c = next(c for c in cands if c.key == k)
                    settle(x.device)   # the last runtime's thread pool idle first (ldeq_fast.benchmark.SETTLE_S)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        c.call(x)
                    if rep:
                        times[k].append(time.perf_counter() - t0)
                    if bar is not None:
                        bar.update(1)
            for c in cands:
                c.entry.setdefault("ms_per_image", {})[str(bs)] = 1e3 * statistics.median(times[c.key]) / bs
                c.entry.setdefault("times_s", {})[str(bs)] = times[c.key]
    finally:
        if bar is not None:
            bar.close()
        tmp.cleanup()
    for p in paths:
        ok = [e for e in out["candidates"] if e["path"] == p and e["within"]]
        if not ok:
            out["paths"][p] = {"reached": False}
            continue
        best = {}
        for bs in map(str, batches):
            e = min(ok, key=lambda e: e["ms_per_image"][bs])
            best[bs] = {"ms_per_image": e["ms_per_image"][bs], "method": e["method"], "z0": e["z0"],
                        "evals": e["evals"], key: e[key]}
        out["paths"][p] = {"reached": True, "best": best,
                           **({"version": peers.peer_version(p)} if p in peers.ONNX_PEERS else {})}
    for bs in map(str, batches):
        others = {p: v["best"][bs]["ms_per_image"] for p, v in out["paths"].items() if v["reached"] and p != "fast"}
        if out["paths"].get("fast", {}).get("reached") and others:
            f = out["paths"]["fast"]["best"][bs]["ms_per_image"]
            out.setdefault("fast_speedup", {})[bs] = {p: t / f for p, t in others.items()}
            out.setdefault("fast_ahead_of_all", {})[bs] = all(t > f for t in others.values())
    return out


def format_time_to_accuracy(ta: dict) -> str:
    key = ta["error"]
    lines = [f"time per image to come within the limit ({ta['rule']}), each path at its cheapest setting that gets "
             f"there; median of {ta['repeats']} interleaved runs"]
    lines.append(f"{'path':<12} " + " ".join(f"{'ms/img b' + b:>11}" for b in map(str, ta["batches"]))
                 + "  setting (at the last batch)         error %   fast is")
    last = str(ta["batches"][-1])
    for p, v in ta["paths"].items():
        if not v["reached"]:
            lines.append(f"{p:<12} did not come within the limit at any measured setting")
            continue
        b = v["best"][last]
        sp = ta.get("fast_speedup", {}).get(last, {}).get(p)
        name = p + (f" {v['version']}" if "version" in v else "")
        lines.append(f"{name:<12} " + " ".join(f"{v['best'][bs]['ms_per_image']:>11.2f}" for bs in map(str, ta["batches"]))
                     + f"  {b['method']} from {b['z0']}, {b['evals']} evaluations".ljust(36)
                     + f" {100 * b[key]:>7.3f}   " + ("-" if sp is None else f"{sp:.2f}x faster"))
    for s in ta["skipped"]:
        lines.append(f"(skipped {s['path']}: {s['why']})")
    for bs, ahead in ta.get("fast_ahead_of_all", {}).items():
        lines.append(f"batch {bs}: fast {'ahead of' if ahead else 'NOT ahead of'} every other path")
    return "\n".join(lines)


def _plot_time_to_accuracy(ax, ta: dict) -> None:
    """Bars: ms per image to come within the limit, per path and batch, each bar labelled with its setting."""
    names = [p for p, v in ta["paths"].items() if v["reached"]]
    batches = [str(b) for b in ta["batches"]]
    w = 0.8 / max(1, len(batches))
    for j, bs in enumerate(batches):
        ys = [ta["paths"][p]["best"][bs]["ms_per_image"] for p in names]
        xs = [i + (j - (len(batches) - 1) / 2) * w for i in range(len(names))]
        bars = ax.bar(xs, ys, w, label=f"batch {bs}", color=f"C{j}")
        for b, p in zip(bars, names):
            v = ta["paths"][p]["best"][bs]
            ax.annotate(f"{v['method']}/{v['z0']}\n{v['evals']} ev", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([p + (f"\n{ta['paths'][p]['version']}" if "version" in ta["paths"][p] else "")
                        for p in names], fontsize=8)
    ax.set_ylabel("ms per image")
    ax.set_title("time to come within 1% of the converged error" if "1%" in ta["rule"] else "time to the limit",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
