"""The DEQ layer: forward solve without a graph, then one tracked step, with a choice of backward.

* ``jfb``: Jacobian-free backprop, the gradient of the single tracked step f(z*).
* ``phantom``: ``k`` damped unrolled steps z <- (1-d) z + d f(z) from z*, all tracked.
* ``ift``: implicit differentiation. The tracked step z_new = f(z*) is wrapped in ``_ImplicitGrad``,
  whose backward replaces the incoming gradient v by the solution g of g = g (df/dz)(z*) + v, found with the
  same fixed-point machinery (``ldeq_fast.solvers.solve``) on vector-Jacobian products through z_new's own
  graph.  Nothing holds a reference from z_new back to the wrapper, so an output dropped without
  ``backward()`` frees everything (the published hook design leaked in that case), and the graph of f is
  only the one tracked step: memory is O(1) in the number of solver iterations.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

from ldeq_fast.solvers import solve


@dataclass
class SolverSettings:
    method: str = "anderson"
    max_iter: int = 10
    tol: float = 5e-3
    stop_mode: str = "rel"
    m: int = 6
    lam: float = 1e-4
    lam_mode: str = "scaled"
    beta: float = 1.0
    semantics: str = "per_sample"
    backend: str = "auto"
    check_every: int = 1
    fixed_iters: bool = False

    @classmethod
    def from_config(cls, cfg, max_iter: int, **changes) -> "SolverSettings":
        """The settings an LDEQConfig describes, for ``max_iter`` iterations: the one place a config becomes
        solver settings (the model's forward and backward solves, the tracker, the compat layer)."""
        per_sample = cfg.solver_semantics == "per_sample"
        s = cls(method=cfg.solver, max_iter=int(max_iter), tol=cfg.tol, stop_mode=cfg.stop_mode, m=cfg.anderson_m,
                lam=cfg.anderson_lam, lam_mode=cfg.lam_mode if per_sample else "absolute", beta=cfg.anderson_beta,
                semantics=cfg.solver_semantics, backend=cfg.backend, check_every=cfg.check_every)
        return dataclasses.replace(s, **changes)

    def kwargs(self) -> dict:
        return dict(method=self.method, max_iter=self.max_iter, tol=self.tol, stop_mode=self.stop_mode, m=self.m,
                    lam=self.lam, lam_mode=self.lam_mode, beta=self.beta, semantics=self.semantics,
                    backend=self.backend, check_every=self.check_every, fixed_iters=self.fixed_iters)


@dataclass
class BackwardLog:
    """Where the implicit backward reports its solver stats (one entry per backward call)."""
    stats: list = field(default_factory=list)

    def clear(self):
        self.stats.clear()


class _ImplicitGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_new, z_star, settings, log):
        # saved inputs keep their graph; nothing in z_new's graph points back to this node, so no cycle
        ctx.settings, ctx.log = settings, log
        ctx.save_for_backward(z_new, z_star)
        return z_new.view_as(z_new)

    @staticmethod
    def backward(ctx, grad):
        z_new, z_star = ctx.saved_tensors

        def vjp_fixed_point(y):
            (vjp,) = torch.autograd.grad(z_new, z_star, y, retain_graph=True)
            return vjp + grad

        with torch.enable_grad():
            g, stats = solve(vjp_fixed_point, torch.zeros_like(grad), **ctx.settings.kwargs())
        if ctx.log is not None:
            ctx.log.stats.append(stats)
        if bool(stats.diverged.any()):
            # such a sample's gradient is its best iterate (zeros if the first one failed), not the implicit
            # gradient: say so (the trainer skips the step; see ldeq_fast/train.py)
            warnings.warn(f"ldeq_fast: the implicit backward solve diverged for {int(stats.diverged.sum())} of "
                          f"{stats.diverged.numel()} samples; their gradients are not the implicit gradient",
                          RuntimeWarning, stacklevel=2)
        return g, None, None, None


def deq_fixed_point(f, z0, settings: SolverSettings, *, grad_mode: str = "ift", extra_step: bool = True,
                    backward_settings: SolverSettings | None = None, phantom_steps: int = 5,
                    phantom_damping: float = 0.8, log: BackwardLog | None = None):
    """Solve z = f(z) from z0.  Returns (z, forward SolverStats).

    Without grad (inference): the solver's answer, followed by one more f step unless ``extra_step`` is
    False.  With grad enabled: the tracked step(s) of ``grad_mode``.
    """
    with torch.no_grad():
        z_star, stats = solve(f, z0, **settings.kwargs())
    if not torch.is_grad_enabled():
        if extra_step:
            with torch.no_grad():
                z_star = f(z_star)
        return z_star, stats
    if grad_mode == "jfb":
        return f(z_star.detach()), stats
    if grad_mode == "phantom":
        z = z_star.detach()
        for _ in range(phantom_steps):
            z = (1 - phantom_damping) * z + phantom_damping * f(z)
        return z, stats
    if grad_mode != "ift":
        raise ValueError(f"grad_mode must be 'ift', 'phantom' or 'jfb', not {grad_mode!r}")
    z_star = z_star.detach().requires_grad_()
    z_new = f(z_star)
    return _ImplicitGrad.apply(z_new, z_star, backward_settings or settings, log), stats
