"""The published LDEQ solvers' semantics, for parity runs (same landmarks as the published code).

Differences from the per-sample engine, kept on purpose here:
* stopping on the *batch mean* residual (a sample's answer depends on its batch);
* Anderson returns the iterate X (not f(X)) with the lowest batch-mean residual seen, and its
  schedule is X0 = z0, X1 = f(z0), then N mixed iterates: f is evaluated up to N + 2 times;
* absolute regulariser lam on the Gram matrix; rel residual = ||F - X|| / ||1e-5 + F||
  (the 1e-5 is added elementwise before the norm);
* fixed-point iteration returns its last image and measures ||x_new - x|| / (1e-5 + ||x_new||).
"""
from __future__ import annotations

import torch

from ldeq_fast.solvers.stats import SolverStats


def _stats(method, n_iters, trace_abs, trace_rel, best_abs, best_rel, stop_mode, tol, B, dev, max_iter, extra):
    res = best_rel if stop_mode == "rel" else best_abs
    trace = torch.tensor(trace_rel if stop_mode == "rel" else trace_abs, dtype=torch.float32)
    trace = trace.view(-1, 1).expand(-1, B).to(dev)
    full = torch.full((B,), float(res), device=dev)
    conv = torch.full((B,), bool(res < tol), device=dev)
    return SolverStats(method=method, max_iter=max_iter, nstep=torch.full((B,), n_iters, device=dev),
                       best_residual=full, abs_residual=torch.full((B,), float(best_abs), device=dev),
                       rel_residual=torch.full((B,), float(best_rel), device=dev), trace=trace,
                       converged=conv, diverged=torch.full((B,), not torch.isfinite(torch.tensor(res)).item(),
                                                           device=dev),
                       stop_mode=stop_mode, tol=tol, semantics="published", extra=extra)


def anderson_published(f, z0, max_iter=10, tol=5e-3, stop_mode="rel", m=6, lam=1e-4, beta=1.0,
                       save_trajectory=False):
    shape, B = z0.shape, z0.shape[0]
    x0 = z0.reshape(B, -1)
    D = x0.shape[1]
    m = int(m)

    def fe(v):
        return f(v.view(shape)).reshape(B, -1)

    X = x0.new_zeros(B, m, D)
    F = x0.new_zeros(B, m, D)
    X[:, 0] = x0
    F[:, 0] = fe(x0)
    X[:, 1] = F[:, 0]
    F[:, 1] = fe(F[:, 0])
    H = x0.new_zeros(B, m + 1, m + 1)
    H[:, 0, 1:] = 1
    H[:, 1:, 0] = 1
    y = x0.new_zeros(B, m + 1, 1)
    y[:, 0] = 1
    trace = {"abs": [], "rel": []}
    lowest = {"abs": float("inf"), "rel": float("inf")}
    lowest_step = {"abs": 0, "rel": 0}
    best = None
    trajectory = []
    stability, prev_abs = 1, None
    k = 1
    for k in range(2, max_iter + 2):
        n = min(k, m)
        Gk = F[:, :n] - X[:, :n]
        H[:, 1:n + 1, 1:n + 1] = torch.bmm(Gk, Gk.transpose(1, 2)) + lam * torch.eye(n, dtype=x0.dtype,
                                                                                      device=x0.device)[None]
        alpha = torch.linalg.solve(H[:, :n + 1, :n + 1], y[:, :n + 1])[:, 1:n + 1, 0]
        mixed = beta * torch.einsum("bn,bnd->bd", alpha, F[:, :n])
        if beta != 1.0:
            mixed = mixed + (1 - beta) * torch.einsum("bn,bnd->bd", alpha, X[:, :n])
        X[:, k % m] = mixed
        F[:, k % m] = fe(X[:, k % m])
        g = F[:, k % m] - X[:, k % m]
        abs_d = g.norm(dim=1).mean().item()
        rel_d = (g.norm(dim=1) / (1e-5 + F[:, k % m]).norm(dim=1)).mean().item()
        trace["abs"].append(abs_d)
        trace["rel"].append(rel_d)
        for mode, val in (("rel", rel_d), ("abs", abs_d)):
            if val < lowest[mode] or k == 2:
                if mode == stop_mode:
                    best = X[:, k % m].clone()
                lowest[mode] = val
                lowest_step[mode] = k
        if save_trajectory:
            trajectory.append(X[:, k % m].view(shape).clone())
        if prev_abs is not None and abs_d > prev_abs:
            stability = 0
        prev_abs = abs_d
        if trace[stop_mode][-1] < tol:
            break
    extra = {"n_iters": k - 1, "stability": stability, "trajectory": trajectory, "trace_abs": trace["abs"],
             "trace_rel": trace["rel"], "nstep_best": lowest_step[stop_mode]}
    stats = _stats("anderson", k - 1, trace["abs"], trace["rel"], lowest["abs"], lowest["rel"], stop_mode, tol,
                   B, x0.device, max_iter, extra)
    return best.view(shape), stats


def fixed_point_published(f, z0, max_iter=10, tol=5e-3, stop_mode="rel", save_trajectory=False):
    B = z0.shape[0]
    x_prev = z0
    trajectory, trace_abs, trace_rel = [], [], []
    stability, prev_abs = 1, None
    it = 0
    x_new = z0
    abs_d = rel_d = float("inf")
    while it < max_iter:
        x_new = f(x_prev)
        diff = (x_new - x_prev).reshape(B, -1).norm(dim=1)
        abs_d = diff.mean().item()
        rel_d = (diff / (1e-5 + x_new.reshape(B, -1).norm(dim=1))).mean().item()
        trace_abs.append(abs_d)
        trace_rel.append(rel_d)
        if save_trajectory:
            trajectory.append(x_new.clone())
        if prev_abs is not None and abs_d > prev_abs:
            stability = 0
        prev_abs = abs_d
        it += 1
        if (rel_d if stop_mode == "rel" else abs_d) < tol:
            break
        x_prev = x_new
    extra = {"n_iters": it, "stability": stability, "trajectory": trajectory, "trace_abs": trace_abs,
             "trace_rel": trace_rel}
    stats = _stats("fpi", it, trace_abs, trace_rel, abs_d, rel_d, stop_mode, tol, B, z0.device, max_iter, extra)
    return x_new, stats
