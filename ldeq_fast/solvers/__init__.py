"""DEQ fixed-point solvers behind one signature.

``solve(f, z0, method=..., max_iter=..., tol=..., stop_mode=...)`` returns ``(z, SolverStats)``.

* ``semantics='per_sample'`` (default): per-sample stopping and best-point return (see
  ldeq_fast/solvers/reference.py for the exact conventions).  ``backend='torch'`` runs the plain
  reference; any other backend runs the fused engine (ldeq_fast/solvers/fused.py), whose ops pick
  Triton / C++ / CUDA kernels by device (``LDEQ_FAST_BACKEND`` forces one).
* ``semantics='published'``: the published code's batch-mean stopping, for parity runs.
"""
from __future__ import annotations

import os

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


def resolve_backend(backend: str | None) -> str:
    backend = backend or "auto"
    env = os.environ.get("LDEQ_FAST_BACKEND")
    if backend == "auto" and env:
        backend = env
    if backend not in ("auto", "torch", "triton", "cpp", "cuda"):
        raise ValueError(f"unknown backend {backend!r}: expected auto|torch|triton|cpp|cuda")
    return backend


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
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got {z0.dtype}")
    if not fixed_iters and not bool(z0.isfinite().all()):  # a host sync: skipped in capturable solves
        raise ValueError("z0 contains NaN or inf")
    if semantics == "published":
        if method == "anderson":
            return anderson_published(f, z0, max_iter, tol, stop_mode, m, lam, beta)
        if method == "fpi":
            return fixed_point_published(f, z0, max_iter, tol, stop_mode)
        raise ValueError("semantics='published' supports anderson and fpi (the published broyden is not "
                         "used by LDEQ inference)")
    if semantics != "per_sample":
        raise ValueError(f"semantics must be 'per_sample' or 'published', not {semantics!r}")
    backend = resolve_backend(backend)
    if method == "broyden" or backend == "torch":
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
