"""Solver statistics: tensors, per sample, so nothing forces a host sync until someone reads them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SolverStats:
    method: str
    max_iter: int
    nstep: torch.Tensor            # (B,) int: f evaluations while the sample was active
    best_residual: torch.Tensor    # (B,) lowest residual (stop mode) of the returned point's iterate
    abs_residual: torch.Tensor     # (B,) ||f(x) - x|| of that iterate
    rel_residual: torch.Tensor     # (B,) abs / (||f(x)|| + 1e-5)
    trace: torch.Tensor            # (T, B) residual (stop mode) per iteration, NaN once a sample stopped
    converged: torch.Tensor        # (B,) bool: reached the tolerance
    diverged: torch.Tensor         # (B,) bool: NaN/inf or residual blow-up; the sample was frozen
    stop_mode: str = "rel"
    tol: float = 0.0
    backend: str = "torch"
    semantics: str = "per_sample"
    extra: dict = field(default_factory=dict)

    @property
    def any_diverged(self) -> bool:
        return bool(self.diverged.any())

    def summary(self) -> dict:
        """Plain-Python view (one host sync)."""
        return {
            "method": self.method, "backend": self.backend, "semantics": self.semantics,
            "max_iter": self.max_iter, "stop_mode": self.stop_mode, "tol": self.tol,
            "nstep": self.nstep.tolist(), "best_residual": self.best_residual.tolist(),
            "converged": self.converged.tolist(), "diverged": self.diverged.tolist(),
        }


def residuals(fx: torch.Tensor, x: torch.Tensor):
    """Per-sample (abs, rel) residual of the iterate x with image fx, both (B, D); fp32 or better."""
    g = fx - x
    acc = torch.promote_types(fx.dtype, torch.float32)
    abs_r = torch.linalg.vector_norm(g.to(acc), dim=1)
    rel_r = abs_r / (torch.linalg.vector_norm(fx.to(acc), dim=1) + 1e-5)
    return abs_r, rel_r
