"""ldeq_fast's solvers inside torchdeq (0.1): registered as ``'ldeq_fast_anderson'`` and
``'ldeq_fast_fixed_point_iter'`` in torchdeq's solver registry on import, so

    import ldeq_fast.compat.torchdeq  # noqa: F401
    deq = torchdeq.get_deq(f_solver="ldeq_fast_anderson", b_solver="ldeq_fast_anderson", ...)

runs torchdeq's DEQ (forward solve, IFT / phantom backward) on the fused engine
(ldeq_fast/solvers/fused.py; the plain PyTorch reference where the engine is not importable).

Contract kept with torchdeq's own solvers: signature ``(func, x0, max_iter, tol, stop_mode, indexing, m, lam,
tau, return_final, **kwargs)``, ``max_iter`` counts evaluations of ``func``, the answer is the image f(x) of the
iterate with the lowest residual, ``tau`` is the damping, ``lam`` an absolute regulariser (pass
``lam_mode='scaled'`` in ``solver_kwargs`` for ldeq_fast's scaled one), and the return is
``(z, indexing_list, SolverStat)``.

Differences, by design: each sample stops on its own (torchdeq runs the whole batch until the worst sample
converges; frozen samples keep their answer, so results agree to within ``tol``); the relative residual
divides by ||f(x)|| + 1e-5 (torchdeq: + 1e-9); ``nstep`` is the number of evaluations a sample took (torchdeq:
the step of its lowest residual); the stats trace is per iteration only for ``stop_mode``'s residual (the
other mode's ``*_trace`` holds just the returned point's value, shape (B, 1)); intermediate trajectory states
(``indexing`` before ``max_iter``, i.e. torchdeq's ``n_states > 1``) and ``return_final=True`` are refused
with an error rather than approximated.
"""
from __future__ import annotations

import importlib.util

import torch

try:
    from torchdeq.solver import register_solver
    from torchdeq.solver.stat import SolverStat
except ImportError as exc:  # pragma: no cover - exercised by hiding torchdeq in the tests
    raise ImportError("ldeq_fast.compat.torchdeq needs torchdeq (>= 0.1): pip install torchdeq "
                      f"(or pip install 'ldeq_fast[bench]'); importing it failed with: {exc}") from exc

from ldeq_fast.solvers import solve

__all__ = ["ldeq_fast_anderson", "ldeq_fast_fixed_point_iter", "register", "SOLVERS", "default_backend"]


def default_backend() -> str:
    """'auto' (the fused engine, kernels picked by device) when the engine is importable, else 'torch'."""
    return "auto" if importlib.util.find_spec("ldeq_fast.solvers.fused") is not None else "torch"


def _trace_rows(stats) -> torch.Tensor:
    """(B, T) stop-mode residual per iteration run; after a sample stopped, its lowest value (as torchdeq pads)."""
    trace = stats.trace
    ran = int(torch.isfinite(trace).any(dim=1).sum())
    rows = trace[: max(ran, 1)].T
    return torch.where(torch.isnan(rows), stats.best_residual[:, None].to(rows.dtype), rows)


def _stat(stats, stop_mode: str) -> SolverStat:
    lowest = {"abs": stats.abs_residual, "rel": stats.rel_residual}
    traces = {mode: value[:, None] for mode, value in lowest.items()}
    traces[stop_mode] = _trace_rows(stats)
    return SolverStat(abs_lowest=lowest["abs"], rel_lowest=lowest["rel"], abs_trace=traces["abs"],
                      rel_trace=traces["rel"], nstep=stats.nstep.to(lowest["abs"].dtype))


def _run(method, func, x0, max_iter, tol, stop_mode, indexing, m, lam, tau, return_final, lam_mode, backend):
    if return_final:
        raise NotImplementedError("ldeq_fast solvers return the best point, not the last one: return_final=True "
                                  "is not supported (use torchdeq's own solvers for it)")
    max_iter = int(max_iter)
    early = sorted(i for i in (indexing or []) if i < max_iter)
    if early:
        raise NotImplementedError(f"ldeq_fast solvers do not keep intermediate states; indexing={list(indexing)} asks "
                                  f"for step(s) {early} before max_iter={max_iter} (torchdeq n_states > 1 or "
                                  "indexing): use n_states=1 or torchdeq's own solvers")
    flat = x0 if x0.dim() >= 2 else x0.reshape(-1, 1)  # torchdeq's convention: a 0/1-d x0 is a batch of scalars

    def f(z):
        return func(z.view_as(x0)).reshape(flat.shape)

    z, stats = solve(f, flat, method=method, max_iter=max_iter, tol=float(tol), stop_mode=stop_mode, m=int(m),
                     lam=float(lam), lam_mode=lam_mode, beta=float(tau), damping=float(tau),
                     backend=backend or default_backend())
    z = z.view_as(x0)
    return z, ([z] if indexing else []), _stat(stats, stop_mode)


def ldeq_fast_anderson(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, m=6, lam=1e-4, tau=1.0,
                       return_final=False, lam_mode="absolute", backend=None, **kwargs):
    """torchdeq-compatible Anderson acceleration on ldeq_fast's engine (per-sample stopping)."""
    return _run("anderson", func, x0, max_iter, tol, stop_mode, indexing, m, lam, tau, return_final, lam_mode, backend)


def ldeq_fast_fixed_point_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, tau=1.0,
                               return_final=False, backend=None, **kwargs):
    """torchdeq-compatible (damped) fixed-point iteration on ldeq_fast's engine (per-sample stopping)."""
    return _run("fpi", func, x0, max_iter, tol, stop_mode, indexing, 1, 0.0, tau, return_final, "absolute", backend)


SOLVERS = {"ldeq_fast_anderson": ldeq_fast_anderson, "ldeq_fast_fixed_point_iter": ldeq_fast_fixed_point_iter}


def register() -> None:
    """Put the solvers in torchdeq's registry (idempotent; done on import)."""
    for name, fn in SOLVERS.items():
        register_solver(name, fn)


register()
