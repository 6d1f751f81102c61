"""Reference DEQ solvers in plain PyTorch, with per-sample stopping.

These are the oracle every fused kernel is tested against, so they favour obviousness over speed:
the Anderson Gram matrix is recomputed in full each iteration and the small bordered system is
solved with ``torch.linalg.solve`` in float64.

Conventions shared with the fused engine (ldeq_fast/solvers/fused.py):
* ``max_iter`` counts evaluations of f.  Iterate x_k is evaluated once; its residual is
  ``||f(x_k) - x_k||`` (abs) or that over ``||f(x_k)|| + 1e-5`` (rel).
* A sample stops (is frozen) as soon as its residual is below ``tol``, or when it diverges (NaN/inf,
  or a residual ``divergence_factor`` times its first one).  Frozen samples never change again, so a
  sample's answer does not depend on the rest of its batch.
* The returned point is ``f(x_best)``, the image of the iterate with the lowest residual: one free
  fixed-point step past the best iterate, already computed.  With ``max_iter=1`` that is f(z0),
  never z0 itself (what RwR's one-iteration video solves need).
"""
from __future__ import annotations

import torch

from ldeq_fast.solvers.stats import SolverStats, residuals

DIVERGENCE_FACTOR = 1e4


class _Tracker:
    """Per-sample bookkeeping: stopping, best point, stats."""

    def __init__(self, x0: torch.Tensor, max_iter: int, tol: float, stop_mode: str, divergence_factor: float):
        B = x0.shape[0]
        dev = x0.device
        acc = torch.promote_types(x0.dtype, torch.float32)
        self.tol, self.stop_mode, self.max_iter = tol, stop_mode, max_iter
        self.divergence_factor = divergence_factor
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.diverged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.nstep = torch.zeros(B, dtype=torch.int64, device=dev)
        self.best = x0.clone()
        self.best_res = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.best_abs = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.best_rel = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.first_res = torch.full((B,), float("nan"), dtype=acc, device=dev)
        self.trace = torch.full((max_iter, B), float("nan"), dtype=acc, device=dev)

    def observe(self, k: int, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """Record f(x_k) for the active samples; return the mask of samples still active afterwards."""
        abs_r, rel_r = residuals(fx, x)
        res = rel_r if self.stop_mode == "rel" else abs_r
        act = self.active
        if k == 0:
            self.first_res = res.clone()
        bad = ~torch.isfinite(res) | (res > self.divergence_factor * self.first_res.clamp_min(1e-30))
        improved = act & ~bad & (res < self.best_res)
        self.best = torch.where(improved[:, None], fx, self.best)
        self.best_res = torch.where(improved, res, self.best_res)
        self.best_abs = torch.where(improved, abs_r, self.best_abs)
        self.best_rel = torch.where(improved, rel_r, self.best_rel)
        self.nstep = self.nstep + act.long()
        self.trace[k] = torch.where(act, res, torch.full_like(res, float("nan")))
        self.diverged |= act & bad
        self.converged |= act & ~bad & (res < self.tol)
        self.active = act & ~bad & ~(res < self.tol)
        return self.active

    def result(self, method: str, semantics: str = "per_sample", backend: str = "torch"):
        # a sample whose first evaluation already diverged never improved on its start: it returns z0
        stats = SolverStats(method=method, max_iter=self.max_iter, nstep=self.nstep, best_residual=self.best_res,
                            abs_residual=self.best_abs, rel_residual=self.best_rel, trace=self.trace,
                            converged=self.converged, diverged=self.diverged, stop_mode=self.stop_mode,
                            tol=self.tol, backend=backend, semantics=semantics)
        return self.best, stats


def _flat(f, z0):
    shape = z0.shape
    B = shape[0]

    def fflat(x):
        return f(x.view(shape)).reshape(B, -1)

    return fflat, z0.reshape(B, -1)


def fixed_point_reference(f, z0, max_iter=10, tol=1e-3, stop_mode="rel", damping=1.0,
                          divergence_factor=DIVERGENCE_FACTOR):
    """x_{k+1} = x_k + damping * (f(x_k) - x_k), per-sample stopping."""
    fflat, x = _flat(f, z0)
    tr = _Tracker(x, max_iter, tol, stop_mode, divergence_factor)
    for k in range(max_iter):
        fx = fflat(x)
        active = tr.observe(k, x, fx)
        if not bool(active.any()):
            break
        x = torch.where(active[:, None], x + damping * (fx - x), x)
    z, stats = tr.result("fpi")
    return z.view(z0.shape), stats


def anderson_weights_reference(G: torch.Tensor, valid: torch.Tensor, lam: float, lam_mode: str):
    """Anderson mixing weights for residual history G (B, m, D) with valid slots (B, m) bool.

    Solves the bordered system [[0, 1^T], [1, GG^T + reg I]] [nu, alpha] = [1, 0] per sample in
    float64, with invalid slots decoupled (alpha_j = 0).  reg = lam (absolute) or
    lam * max_j (GG^T)_jj (scaled to the Gram diagonal).
    """
    B, m, _ = G.shape
    Gd = G.double()
    H = torch.bmm(Gd, Gd.transpose(1, 2))
    vmask = valid.double()
    H = H * vmask[:, :, None] * vmask[:, None, :]
    if lam_mode == "scaled":
        reg = lam * torch.diagonal(H, dim1=1, dim2=2).amax(dim=1).clamp_min(1e-30)
    else:
        reg = torch.full((B,), float(lam), dtype=torch.float64, device=G.device)
    eye = torch.eye(m, dtype=torch.float64, device=G.device)
    # valid slots get the regulariser; invalid ones an identity row/column (decoupled, alpha = 0)
    H = H + eye * torch.where(valid, reg[:, None], torch.ones_like(reg)[:, None])[:, None, :]
    A = torch.zeros(B, m + 1, m + 1, dtype=torch.float64, device=G.device)
    A[:, 0, 1:] = vmask
    A[:, 1:, 0] = vmask
    A[:, 1:, 1:] = H
    rhs = torch.zeros(B, m + 1, 1, dtype=torch.float64, device=G.device)
    rhs[:, 0] = 1.0
    return torch.linalg.solve(A, rhs)[:, 1:, 0]


def anderson_reference(f, z0, max_iter=10, tol=1e-3, stop_mode="rel", m=6, lam=1e-4, lam_mode="scaled",
                       beta=1.0, divergence_factor=DIVERGENCE_FACTOR):
    """Anderson acceleration with per-sample stopping; ring buffers of the last m iterates/residuals."""
    fflat, x = _flat(f, z0)
    B, D = x.shape
    X = x.new_zeros(B, m, D)
    G = x.new_zeros(B, m, D)
    tr = _Tracker(x, max_iter, tol, stop_mode, divergence_factor)
    for k in range(max_iter):
        fx = fflat(x)
        was_active = tr.active
        active = tr.observe(k, x, fx)
        slot = k % m
        X[:, slot] = torch.where(was_active[:, None], x, X[:, slot])
        G[:, slot] = torch.where(was_active[:, None], fx - x, G[:, slot])
        if not bool(active.any()) or k == max_iter - 1:
            break
        n = min(k + 1, m)
        valid = torch.zeros(B, m, dtype=torch.bool, device=x.device)
        valid[:, :n] = True
        alpha = anderson_weights_reference(G, valid, lam, lam_mode).to(x.dtype)
        x_new = torch.einsum("bj,bjd->bd", alpha, X + beta * G)
        x = torch.where(active[:, None], x_new, x)
    z, stats = tr.result("anderson")
    return z.view(z0.shape), stats


def broyden_reference(f, z0, max_iter=10, tol=1e-3, stop_mode="rel", divergence_factor=DIVERGENCE_FACTOR):
    """Good Broyden on g(x) = f(x) - x with a low-rank inverse-Jacobian estimate, per-sample stopping."""
    fflat, x = _flat(f, z0)
    B, D = x.shape
    Us = x.new_zeros(B, max_iter, D)
    VTs = x.new_zeros(B, max_iter, D)
    tr = _Tracker(x, max_iter, tol, stop_mode, divergence_factor)

    def inv_jac_times(v, n):   # (-I + U V^T) v
        if n == 0:
            return -v
        return -v + torch.einsum("bnd,bn->bd", Us[:, :n], torch.einsum("bnd,bd->bn", VTs[:, :n], v))

    def vec_inv_jac(v, n):     # v^T (-I + U V^T)
        if n == 0:
            return -v
        return -v + torch.einsum("bn,bnd->bd", torch.einsum("bd,bnd->bn", v, Us[:, :n]), VTs[:, :n])

    gx, x_prev = None, x
    for k in range(max_iter):
        fx = fflat(x)
        g_new = fx - x
        active_before = tr.active
        active = tr.observe(k, x, fx)
        if k > 0:
            dx, dg = x - x_prev, g_new - gx
            vT = vec_inv_jac(dx, k - 1)
            denom = (vT * dg).sum(1, keepdim=True)
            u = (dx - inv_jac_times(dg, k - 1)) / torch.where(denom == 0, torch.ones_like(denom), denom)
            keep = active_before[:, None] & (denom != 0)
            VTs[:, k - 1] = torch.where(keep, vT, 0.0)
            Us[:, k - 1] = torch.where(keep, u, 0.0)
        if not bool(active.any()) or k == max_iter - 1:
            break
        gx = torch.where(active_before[:, None], g_new, gx if gx is not None else g_new)
        update = -inv_jac_times(gx, k)
        x_prev = x
        x = torch.where(active[:, None], x + update, x)
    z, stats = tr.result("broyden")
    return z.view(z0.shape), stats
