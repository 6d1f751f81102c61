"""The published-semantics drop-in on CPU: the plain published path against the fused engine, side by side.

``ldeq_fast.compat.published.LDEQ(args)`` at the published model size (LDEQConfig defaults: widths 224/224,
98 landmarks, 256 px images, 64 px heatmaps) with the published solver args (Anderson, m = 6, lam = 1e-4,
rel tol 5e-3, ``--max-iters`` 6 by default), random weights with the published initialisation
(``weights_init``), fp32, ``--threads`` 2:

* plain:  ``LDEQ(args, backend='torch')`` -- the published code's arithmetic: the plain published Anderson
  (ldeq_fast/solvers/published.py) and the eager cell;
* fused:  ``LDEQ(args)`` (backend 'auto') -- the same published semantics on the fused engine (the Anderson
  ops' published policies, C++ on CPU) and the fast cell (fused epilogues, rewritten convs, CPU plan).

Per batch size: images/s (median of ``--repeats``, the two paths alternating and their order swapped every
repeat), the speed-up, the largest keypoint difference in heatmap pixels (keypoint * heatmap_size), the
solver iterations of each path and what ran (``SolverStats.backend`` and ``recording_backends``).  The
fused path's first forward (which may measure the CPU plan) is an untimed warm-up.  ``--profile`` adds the
top ops by self CPU time of one forward of each path at the first batch size.

    python bench/bench_published.py --json bench/results/published_semantics_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import machine_info, write_json

from ldeq_fast import LDEQConfig
from ldeq_fast.compat.published import LDEQ, weights_init
from ldeq_fast.ops import recording_backends


def published_args(cfg: LDEQConfig, max_iters: int) -> argparse.Namespace:
    """The published training args for the config's model (as ldeq_fast.model.published.save_published
    writes them) with the published Anderson solver."""
    return argparse.Namespace(
        landmark_model_name="ldeq", cell_name="Cell0", model_mode="implicit", explicit_depth=cfg.explicit_depth,
        injection_width=cfg.injection_width, cell_base_width=cfg.cell_base_width,
        cell_width_increment=cfg.cell_width_increment, cell_gn_groups=cfg.cell_gn_groups,
        cell_use_bn_for_explicit=cfg.cell_use_bn_for_explicit, cell_norm=cfg.cell_norm,
        cell_softargmax_beta=cfg.softargmax_beta, cell_learn_softargmax_beta=False, n_keypoints=cfg.n_keypoints,
        cell_extra_latent_width=cfg.extra_latent_width, z_width=cfg.z_width, heatmap_size=cfg.heatmap_size,
        im_size=cfg.im_size, z0_mode="zeros", solver="anderson", stop_mode=cfg.stop_mode,
        abs_diff_target=cfg.abs_tol, rel_diff_target=cfg.rel_tol, anderson_m=cfg.anderson_m,
        anderson_lam=cfg.anderson_lam, anderson_beta=cfg.anderson_beta, max_iters=max_iters,
        stochastic_max_iters=False, take_one_less_inference_step=False, JFB=False, verbose_solver=False)


def forward(model, args, x):
    with torch.no_grad(), recording_backends() as ran:
        out = model(x, mode="implicit", args=args)
    return out, dict(ran)


def profile_top(model, args, x, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward(model, args, x)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in rows[:top]]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-iters", type=int, default=6)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LDEQConfig()
    args = published_args(cfg, a.max_iters)
    plain = LDEQ(args, backend="torch")
    plain.apply(weights_init)
    plain.eval()
    fused = LDEQ(args)
    fused.load_state_dict(plain.state_dict())
    fused.eval()
    paths = {"plain": plain, "fused": fused}
    t_start = time.perf_counter()
    rows = []
    for B in a.batches:
        x = torch.randn(B, 3, cfg.im_size, cfg.im_size, generator=torch.Generator().manual_seed(B))
        outs, ran, times = {}, {}, {k: [] for k in paths}
        for name, model in paths.items():  # warm-up (the fused path may measure its CPU plan here)
            outs[name], ran[name] = forward(model, args, x)
        for r in range(a.repeats):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            for name in order:
                t0 = time.perf_counter()
                forward(paths[name], args, x)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        diff_px = (outs["fused"]["keypoints"] - outs["plain"]["keypoints"]).abs().max().item() * cfg.heatmap_size
        row = {
            "batch": B,
            "images_per_s": {k: round(B / med[k], 3) for k in paths},
            "ms_per_forward": {k: {"median": round(med[k] * 1e3, 1), "all": [round(t * 1e3, 1) for t in times[k]]}
                               for k in paths},
            "speedup_fused_vs_plain": round(med["plain"] / med["fused"], 3),
            "max_keypoint_diff_heatmap_px": diff_px,
            "n_iters": {k: outs[k]["fwd_logs"]["n_iters"] for k in paths},
            "final_rel_diff": {k: outs[k]["fwd_logs"]["final_rel_diff"] for k in paths},
            "solver_backend": {k: paths[k].last_stats.backend for k in paths},
            "ran": ran,
        }
        rows.append(row)
        print(f"B={B}: plain {row['images_per_s']['plain']:.3f} img/s, fused {row['images_per_s']['fused']:.3f} img/s, "
              f"x{row['speedup_fused_vs_plain']:.2f}, max keypoint diff {diff_px:.2e} px, "
              f"iters {row['n_iters']}, solver {row['solver_backend']}", file=sys.stderr)
    result = {
        "what": "compat.published.LDEQ(args): plain published path (backend='torch') vs the fused engine "
                "(default backend 'auto'), published semantics, published model size, random weights "
                "(published weights_init), fp32",
        "config": {"widths": [cfg.injection_width, cfg.cell_base_width, cfg.cell_width_increment],
                   "n_keypoints": cfg.n_keypoints, "z_width": cfg.z_width, "im_size": cfg.im_size,
                   "heatmap_size": cfg.heatmap_size, "solver": "anderson", "max_iters": a.max_iters,
                   "anderson_m": cfg.anderson_m, "anderson_lam": cfg.anderson_lam, "stop_mode": cfg.stop_mode,
                   "rel_tol": cfg.rel_tol, "threads": a.threads, "repeats": a.repeats,
                   "order": "alternating, swapped every repeat; medians"},
        "machine": machine_info("cpu"),
        "rows": rows,
    }
    if a.profile:
        x = torch.randn(a.batches[0], 3, cfg.im_size, cfg.im_size, generator=torch.Generator().manual_seed(7))
        result["profile_top_self_cpu"] = {k: profile_top(m, args, x) for k, m in paths.items()}
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
