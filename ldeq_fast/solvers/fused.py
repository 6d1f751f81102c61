"""The fused Anderson / fixed-point engine: same answers as ``anderson_reference`` and
``fixed_point_reference`` (ldeq_fast/solvers/reference.py), in about 2m + 3 passes over the state per
iteration instead of the reference's dozens.

Per iteration (ops in ldeq_fast/ops/anderson.py, one kernel launch each on GPU):
  fx = f(x)
  anderson_update: F[:, s] = fx, G[:, s] = fx - x, new Gram row/column s, ||g||^2, ||fx||^2
  anderson_step:   per-sample residual, divergence, stop masks, best bookkeeping, Anderson weights
  anderson_mix:    best = fx where the residual improved; x = sum_j alpha_j (F_j - (1 - beta) G_j)
No X ring is kept (x_j = F_j - G_j), the Gram matrix is never recomputed in full, and no op reads the
host: the host looks at "is any sample still active" only every ``check_every`` iterations, and never
with ``fixed_iters=True`` (then the solve can be captured in a CUDA graph or traced by
``torch.compile(fullgraph=True)``).  Fixed-point iteration is the same engine with m = 1, beta = damping.

The engine runs under ``torch.no_grad()``: a DEQ forward solve needs no graph (gradients come from
implicit differentiation or a final tracked step of f).

``published_fused`` runs the published solvers' semantics (ldeq_fast/solvers/published.py) on the same
engine and ops, with the ops' published policies (ldeq_fast/ops/anderson.py): batch-mean stopping, the
published residuals, Anderson returning its best *iterate*.  Index mapping (published -> engine): the
published X_0 = z0 is x_0; X_1 = F_0 = f(z0) is x_1 (the engine's first mix has one slot, alpha = 1, and
runs at beta = 1 as the published code's X_1 does); X_k (k >= 2, mixed over n = min(k, m) slots) is the
engine's x_k, mixed at iteration k - 1 over min(k, m) slots; the published code records the residual of
X_k after evaluating F_k = f(X_k), the engine's iteration k.  So a published Anderson with max_iter N is
the engine with N + 2 iterations whose first two are not counted (POLICY_PUBLISHED_ANDERSON), and the
published fixed-point iteration (x <- f(x), return the last image) is the engine with m = 1, beta = 1 and
N iterations (POLICY_PUBLISHED_FPI).
"""
from __future__ import annotations

import math

import torch

from ldeq_fast.ops.anderson import (
    MAX_M,
    POLICY_PER_SAMPLE,
    POLICY_PUBLISHED_ANDERSON,
    POLICY_PUBLISHED_FPI,
    acc_dtype,
    ops_for,
    resolve_backend,
)
from ldeq_fast.solvers.reference import DIVERGENCE_FACTOR
from ldeq_fast.solvers.stats import SolverStats


def _check_args(z0, max_iter, tol, stop_mode, m, lam, lam_mode, beta, check_every, divergence_factor):
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a tensor, got {type(z0).__name__}")
    if z0.dim() < 1 or z0.shape[0] < 1 or z0.numel() == 0:
        raise ValueError(f"z0 must have a non-empty batch dimension and state, got shape {tuple(z0.shape)}")
    if z0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the fused solver keeps its state in float32 or float64, got z0 of dtype {z0.dtype}; "
                        "cast z0 (and have f return that dtype)")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    if stop_mode not in ("rel", "abs"):
        raise ValueError(f"stop_mode must be 'rel' or 'abs', not {stop_mode!r}")
    if int(m) != m or not 1 <= m <= MAX_M:
        raise ValueError(f"history length m must be an integer in [1, {MAX_M}], got {m}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    if lam_mode not in ("scaled", "absolute"):
        raise ValueError(f"lam_mode must be 'scaled' or 'absolute', not {lam_mode!r}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    if int(check_every) != check_every or check_every < 0:
        raise ValueError(f"check_every must be an integer >= 0, got {check_every}")
    if not (divergence_factor > 0):
        raise ValueError(f"divergence_factor must be > 0, got {divergence_factor}")


def _image(f, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """f(x) as a contiguous (B, D) tensor of x's dtype and device, or a clear error."""
    fx = f(x.view(shape))
    if not isinstance(fx, torch.Tensor):
        raise TypeError(f"f must return a tensor, got {type(fx).__name__}")
    if fx.numel() != x.numel() or (fx.dim() > 0 and fx.shape[0] != x.shape[0]):
        raise ValueError(f"f returned shape {tuple(fx.shape)} for an input of shape {tuple(shape)}")
    if fx.dtype != x.dtype:
        raise TypeError(f"f returned dtype {fx.dtype} for a state of dtype {x.dtype}; the fused solver does not "
                        "change precision silently: make f return the state's dtype")
    if fx.device != x.device:
        raise ValueError(f"f returned a tensor on {fx.device} for a state on {x.device}")
    return fx.reshape(x.shape).contiguous()


def anderson_fused(f, z0: torch.Tensor, max_iter: int = 10, tol: float = 1e-3, stop_mode: str = "rel", m: int = 6,
                   lam: float = 1e-4, lam_mode: str = "scaled", beta: float = 1.0, backend: str | None = "auto",
                   check_every: int = 1, fixed_iters: bool = False,
                   divergence_factor: float = DIVERGENCE_FACTOR, method: str = "anderson"):
    """Solve z = f(z) from z0 (batch first, any shape) with per-sample stopping.  Returns (z, SolverStats)
    with exactly the conventions of ``anderson_reference`` (see ldeq_fast/solvers/reference.py).

    ``check_every``: iterations between host checks for early exit (0: never); ``fixed_iters``: run all
    ``max_iter`` evaluations without any host sync.  Neither changes the answer: stopped samples are
    frozen by masks either way.  ``method`` only labels the stats ('fpi' callers pass m=1, beta=damping).
    """
    _check_args(z0, max_iter, tol, stop_mode, m, lam, lam_mode, beta, check_every, divergence_factor)
    best, stats, _ = _run(f, z0, int(max_iter), tol, stop_mode, int(m), lam, lam_mode == "scaled", beta, backend,
                          int(check_every), fixed_iters, divergence_factor, POLICY_PER_SAMPLE)
    stats.method = method
    return best, stats


def _run(f, z0, max_iter, tol, stop_mode, m, lam, lam_scaled, beta, backend, check_every, fixed_iters,
         divergence_factor, policy):
    """The engine's loop.  Returns (best in z0's shape, SolverStats, the list of per-iteration norms)."""
    # with max_iter < m the extra ring slots would never be written: same iterates, less memory
    m = min(m, max_iter)
    shape = z0.shape
    B = shape[0]
    norms_seen = []
    published_anderson = policy == POLICY_PUBLISHED_ANDERSON
    with torch.no_grad():
        x = z0.reshape(B, -1).clone(memory_format=torch.contiguous_format)
        D = x.shape[1]
        ops = ops_for(resolve_backend(x, backend))
        acc = acc_dtype(x.dtype)
        F = x.new_empty(B, m, D)
        G = x.new_empty(B, m, D)
        gram = torch.zeros(B, m, m, dtype=acc, device=x.device)
        flags = torch.zeros(4, B, dtype=torch.bool, device=x.device)
        flags[0] = True
        stat = torch.full((4, B), float("inf"), dtype=acc, device=x.device)
        stat[3] = float("nan")
        nstep = torch.zeros(B, dtype=torch.int64, device=x.device)
        trace = torch.full((max_iter, B), float("nan"), dtype=acc, device=x.device)
        best = x.clone()  # a sample that diverges at its first evaluation keeps z0, as in the reference
        stop_rel = stop_mode == "rel"
        for k in range(max_iter):
            fx = _image(f, x, shape)
            slot, n = k % m, min(k + 1, m)
            norms = ops.update(fx, x, F, G, gram, flags[0], slot, n)
            if policy != POLICY_PER_SAMPLE:
                norms_seen.append(norms)  # a fresh tensor per iteration: kept, not copied
            alpha = ops.step(gram, norms, flags, stat, nstep, trace, k, n, float(tol), stop_rel, float(lam),
                             lam_scaled, float(divergence_factor), policy)
            last = k == max_iter - 1
            # the published X_1 is f(z0) whatever beta (the engine's first mix has alpha = 1)
            b = 1.0 if published_anderson and k == 0 else float(beta)
            ops.mix(F, G, alpha, flags, x, best, slot, n, b, not last, published_anderson)
            if (not fixed_iters and check_every and not last and (k + 1) % check_every == 0
                    and not bool(flags[0].any())):
                break
    stats = SolverStats(method="anderson", max_iter=max_iter, nstep=nstep, best_residual=stat[0],
                        abs_residual=stat[1], rel_residual=stat[2], trace=trace, converged=flags[1], diverged=flags[2],
                        stop_mode=stop_mode, tol=tol, backend=ops.backend, semantics="per_sample")
    return best.view(shape), stats, norms_seen


def published_fused(f, z0: torch.Tensor, method: str = "anderson", max_iter: int = 10, tol: float = 5e-3,
                    stop_mode: str = "rel", m: int = 6, lam: float = 1e-4, beta: float = 1.0,
                    backend: str | None = "auto", check_every: int = 1, fixed_iters: bool = False):
    """The published solvers (``anderson_published`` / ``fixed_point_published``) on the fused engine.
    Returns (z, SolverStats) with the published path's conventions: ``semantics='published'``, per-sample
    fields holding the batch values, nstep = the published n_iters, trace (T, B) the batch-mean residual of
    the stop mode per recorded iteration (NaN after the stop), and ``extra`` n_iters, trace_abs, trace_rel,
    stability (device tensors: reading them is the caller's host sync), nstep_best (Anderson) and trajectory
    (always empty: the engine keeps no iterates).  f is evaluated max_iter + 2 (Anderson) or max_iter (fpi)
    times at most, as published."""
    if method not in ("anderson", "fpi"):
        raise ValueError(f"published_fused runs the published 'anderson' and 'fpi', not {method!r}")
    anderson = method == "anderson"
    if anderson and int(m) != m or (anderson and m < 2):
        raise ValueError(f"the published Anderson needs a history length m >= 2 (it stores X_0 and X_1), got {m}")
    if not anderson:
        m, beta = 1, 1.0
    _check_args(z0, max_iter, tol, stop_mode, m, lam, "absolute", beta, check_every, DIVERGENCE_FACTOR)
    max_iter = int(max_iter)
    iters = max_iter + 2 if anderson else max_iter
    policy = POLICY_PUBLISHED_ANDERSON if anderson else POLICY_PUBLISHED_FPI
    best, st, norms_seen = _run(f, z0, iters, tol, stop_mode, int(m), lam, False, beta, backend, int(check_every),
                                fixed_iters, DIVERGENCE_FACTOR, policy)
    skip = 2 if anderson else 0
    with torch.no_grad():
        # the batch-mean traces of both modes, from the norms the step saw (no host sync)
        nrm = torch.stack(norms_seen[skip:])                     # (R, B, 3)
        abs_r = nrm[..., 0].sqrt()
        rel_r = abs_r / (nrm[..., 2].sqrt() if anderson else nrm[..., 1].sqrt() + 1e-5)
        tr_abs = (abs_r.double().mean(1)).to(abs_r.dtype)
        tr_rel = (rel_r.double().mean(1)).to(rel_r.dtype)
        n_iters = st.nstep.max() - skip                            # = the published loop's count
        recorded = torch.arange(tr_abs.shape[0], device=tr_abs.device) < n_iters
        tr_abs = torch.where(recorded, tr_abs, float("nan"))
        tr_rel = torch.where(recorded, tr_rel, float("nan"))
        rose = recorded[1:] & (tr_abs[1:] > tr_abs[:-1])
        stability = (~rose.any()).long()
        trace = st.trace[skip:]
        extra = {"n_iters": n_iters, "stability": stability, "trajectory": [], "trace_abs": tr_abs,
                 "trace_rel": tr_rel}
        if anderson:  # the published lowest_step: iteration index (2-based) of the lowest stop-mode mean
            tr = trace[:, 0]
            extra["nstep_best"] = 2 + torch.argmin(torch.where(tr == tr, tr, float("inf")))
        stats = SolverStats(method=method, max_iter=max_iter, nstep=(st.nstep - skip), best_residual=st.best_residual,
                            abs_residual=st.abs_residual, rel_residual=st.rel_residual, trace=trace,
                            converged=st.best_residual < tol, diverged=~torch.isfinite(st.best_residual),
                            stop_mode=stop_mode, tol=tol, backend=st.backend, semantics="published", extra=extra)
    return best, stats
