"""DEQ fixed-point solvers behind one signature.

``solve(f, z0, method=..., max_iter=..., tol=..., stop_mode=...)`` returns ``(z, SolverStats)``.

* ``semantics='per_sample'`` (default): per-sample stopping and best-point return (see
  ldeq_fast/solvers/reference.py for the exact conventions).  ``backend='torch'`` runs the plain
  reference; any other backend runs the fused engine (ldeq_fast/solvers/fused.py), whose Anderson ops run
  the C++ kernels on CPU and the Triton kernels on CUDA (see ldeq_fast.ops.resolve).
* ``semantics='published'``: the published code's batch-mean stopping and best-iterate return, for parity
  runs.  ``backend='torch'`` runs the plain published solvers (ldeq_fast/solvers/published.py, the
  published code's own arithmetic and speed); any other backend runs them on the fused engine
  (``published_fused``: the same Anderson ops with their published policies).
* ``method='broyden'`` has no fused kernels: backend 'cpp' or 'triton' is an error; 'auto' runs the
  PyTorch reference with one warning and records 'torch'.

The state is float32 (float64 for a float64 z0) whatever z0's dtype or autocast (ldeq_fast/numerics.py).
``SolverStats.backend`` says what ran; inside ``ldeq_fast.ops.recording_backends()`` it is noted as 'solver'.
"""
from __future__ import annotations

from ldeq_fast import numerics
from ldeq_fast.notices import warn_once
from ldeq_fast.ops import note, requested_backend
from ldeq_fast.solvers.published import anderson_published, fixed_point_published
from ldeq_fast.solvers.reference import (
    DIVERGENCE_FACTOR,
    anderson_reference,
    broyden_reference,
    fixed_point_reference,
)
from ldeq_fast.solvers.stats import SolverStats

METHODS = ("anderson", "fpi", "broyden")

__all__ = ["solve", "SolverStats", "METHODS", "anderson_reference", "fixed_point_reference", "broyden_reference",
           "anderson_published", "fixed_point_published"]


def solve(f, z0, method: str = "anderson", max_iter: int = 10, tol: float = 1e-3, stop_mode: str = "rel",
          m: int = 6, lam: float = 1e-4, lam_mode: str = "scaled", beta: float = 1.0, damping: float = 1.0,
          semantics: str = "per_sample", backend: str | None = "auto", check_every: int = 1,
          fixed_iters: bool = False, divergence_factor: float = DIVERGENCE_FACTOR):
    """Solve z = f(z) from z0 (any shape with the batch first).  Returns (z, SolverStats).

    ``check_every`` (fused engine): the host looks at convergence every k iterations;
    ``fixed_iters=True`` runs exactly ``max_iter`` evaluations with no host sync (per-sample masking
    still freezes converged samples), which is what CUDA graphs and torch.compile capture.
    """
    if method not in METHODS:
        raise ValueError(f"unknown solver method {method!r}: expected one of {METHODS}")
    if stop_mode not in ("rel", "abs"):
        raise ValueError(f"stop_mode must be 'rel' or 'abs', not {stop_mode!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1 (got {max_iter})")
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must have a non-empty batch dimension, got shape {tuple(z0.shape)}")
    dtype = numerics.state_dtype(z0.dtype)
    z0 = numerics.to_state(z0, dtype)
    if not fixed_iters and not bool(z0.isfinite().all()):  # a host sync: skipped in capturable solves
        raise ValueError("z0 contains NaN or inf")
    f = numerics.in_state_dtype(f, dtype)
    z, stats = _solve(f, z0, method, max_iter, tol, stop_mode, m, lam, lam_mode, beta, damping, semantics, backend,
                      check_every, fixed_iters, divergence_factor)
    note("solver", stats.backend)
    return z, stats


def _solve(f, z0, method, max_iter, tol, stop_mode, m, lam, lam_mode, beta, damping, semantics, backend, check_every,
           fixed_iters, divergence_factor):
    if semantics not in ("per_sample", "published"):
        raise ValueError(f"semantics must be 'per_sample' or 'published', not {semantics!r}")
    backend = requested_backend(backend)
    if method == "broyden":
        if semantics == "published":
            raise ValueError("semantics='published' supports anderson and fpi (the published broyden is not "
                             "used by LDEQ inference)")
        if backend in ("cpp", "triton"):
            raise ValueError(f"method='broyden' has no fused kernels, so backend={backend!r} cannot run it: use "
                             "backend='torch' (or 'auto', which runs the PyTorch reference and records 'torch')")
        if backend == "auto":
            warn_once("broyden-auto", "ldeq_fast: method='broyden' has no fused kernels; backend 'auto' runs "
                      "the PyTorch reference solver (recorded as backend 'torch')")
        return broyden_reference(f, z0, max_iter, tol, stop_mode, divergence_factor)
    if semantics == "published":
        if backend == "torch":  # the plain published solvers: the reference the fused engine is measured against
            if method == "anderson":
                return anderson_published(f, z0, max_iter, tol, stop_mode, m, lam, beta)
            return fixed_point_published(f, z0, max_iter, tol, stop_mode)
        from ldeq_fast.solvers.fused import published_fused  # noqa: PLC0415 - keeps import light

        return published_fused(f, z0, method, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam,
                               beta=beta, backend=backend, check_every=check_every, fixed_iters=fixed_iters)
    if backend == "torch":
        if method == "anderson":
            return anderson_reference(f, z0, max_iter, tol, stop_mode, m, lam, lam_mode, beta, divergence_factor)
        if method == "fpi":
            return fixed_point_reference(f, z0, max_iter, tol, stop_mode, damping, divergence_factor)
        return broyden_reference(f, z0, max_iter, tol, stop_mode, divergence_factor)
    from ldeq_fast.solvers.fused import anderson_fused  # noqa: PLC0415 - keeps import light

    if method == "fpi":  # damped fixed-point iteration is Anderson with a one-slot history
        m, beta = 1, damping
    return anderson_fused(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam, lam_mode=lam_mode,
                          beta=beta, backend=backend, check_every=check_every, fixed_iters=fixed_iters,
                          divergence_factor=divergence_factor, method=method)
