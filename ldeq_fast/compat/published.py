"""Drop-in replacements for the published LDEQ code's ``root_solver`` and ``LDEQ`` model class.

A published evaluation script keeps its call sequence and swaps two imports::

    from ldeq_fast.compat.published import LDEQ, load_checkpoint, weights_init

``LDEQ(args)`` builds ldeq_fast's model from the training ``args`` namespace (parameter names are the
published ones), and ``model(x, mode=..., args=..., z0=...)`` returns the published output dict.  The
solver reads ``args`` at call time (max_iters, solver, stop_mode, tolerances, anderson_*,
take_one_less_inference_step, stochastic_max_iters, explicit_depth, JFB), so the RwR recipe of setting
``args.max_iters = 1`` between calls works unchanged.

Semantics are the published ones by default (batch-mean stopping, Anderson returning its best iterate,
absolute Anderson regulariser: ldeq_fast/solvers/published.py), run by default (backend 'auto') on the
fused engine — the fused Anderson ops with their published policies and the fast cell (fused epilogues,
rewritten convs, CPU plan): the same arithmetic rounded differently, landmarks within ~1e-3 heatmap px.
``LDEQ(args, backend='torch')`` runs the plain published path (the published code's own arithmetic: the
reference the fast one is measured against).  ``LDEQ(args, fast=True)`` or
``args.ldeq_fast_semantics = 'per_sample'`` switches to ldeq_fast's per-sample solver (fused kernels):
each sample's answer no longer depends on its batch, so landmarks differ slightly from the published ones.
"""
from __future__ import annotations

import math
import random
import warnings

import torch

from ldeq_fast import numerics
from ldeq_fast.config import backward_depth, forward_depth
from ldeq_fast.deq import SolverSettings, _ImplicitGrad, deq_fixed_point
from ldeq_fast.model.ldeq import LDEQ as _LDEQ
from ldeq_fast.model.published import (
    CheckpointError,
    _strip_prefix,
    published_args_to_config,
    read_checkpoint,
)
from ldeq_fast.notices import warn_once
from ldeq_fast.ops import note, requested_backend
from ldeq_fast.ops.heatmap import heatmap_keypoints_ref
from ldeq_fast.solvers import solve
from ldeq_fast.solvers.published import anderson_published, fixed_point_published

__all__ = ["root_solver", "LDEQ", "weights_init", "load_checkpoint"]

_SOLVER_FIELDS = {"anderson": ("anderson_m", "anderson_lam", "anderson_beta"), "fpi": ()}


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load`` for published checkpoints.  Since torch 2.6, plain ``torch.load(path)`` refuses the
    ``argparse.Namespace`` they hold; this loads weights-only with that one class allowed."""
    return read_checkpoint(path, map_location)


def _arg(args, name, purpose):
    if not hasattr(args, name):
        raise AttributeError(f"solver_args lacks {name!r} (needed for {purpose})")
    return getattr(args, name)


def _tolerance(args) -> tuple[str, float]:
    stop_mode = _arg(args, "stop_mode", "the stopping rule")
    if stop_mode not in ("rel", "abs"):
        raise ValueError(f"solver_args.stop_mode must be 'rel' or 'abs', not {stop_mode!r}")
    tol = _arg(args, "rel_diff_target" if stop_mode == "rel" else "abs_diff_target", f"stop_mode={stop_mode!r}")
    return stop_mode, float(tol)


def _check_state(x0: torch.Tensor, what: str) -> None:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor")
    if x0.dim() < 1 or x0.shape[0] < 1 or x0.numel() == 0:
        raise ValueError(f"{what} must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError(f"{what} contains NaN or inf")


def root_solver(f, x0, max_iters, solver_args, stochastic_max_iters=False, save_trajectory=False, name="forward",
                backend="auto"):
    """The published ``root_solver``: solve x = f(x) from x0 (the published code passes (B, D, 1)).

    ``backend``: 'auto' / 'cpp' / 'triton' run the published semantics on the fused engine, 'torch' the
    plain published solvers.  ``save_trajectory`` needs the plain path (the engine keeps no iterates):
    with 'auto' it runs that path with one warning (recorded as 'torch'), with 'cpp'/'triton' it is an error.

    Returns ``(solution, logs)`` with logs ``n_iters``, ``final_abs_diff``, ``final_rel_diff`` (floats:
    Anderson's lowest batch-mean residuals, fixed-point iteration's last), ``stability`` (0 once the
    batch-mean abs residual rose between consecutive iterations, else 1), ``trajectory`` (iterates when
    ``save_trajectory``) and ``max_iters`` (drawn from 1..max_iters when ``stochastic_max_iters``).
    The published Broyden solver is not provided (LDEQ inference does not use it).
    """
    solution, logs, _ = _root_solve(f, x0, max_iters, solver_args, stochastic_max_iters, save_trajectory, name,
                                    backend)
    return solution, logs


def _host_extras(stats) -> dict:
    """The published logs' Python values from a solve's extras (the fused engine keeps them as device
    tensors: reading them here is one host sync, as the published code's floats are)."""
    ex = stats.extra
    if not isinstance(ex["n_iters"], torch.Tensor):
        return ex
    n = int(ex["n_iters"])
    return {**ex, "n_iters": n, "stability": int(ex["stability"]), "trace_abs": ex["trace_abs"][:n].tolist(),
            "trace_rel": ex["trace_rel"][:n].tolist()}


def _root_solve(f, x0, max_iters, solver_args, stochastic_max_iters, save_trajectory, name, backend="auto"):
    """root_solver, also returning the SolverStats."""
    if int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters}")
    max_iters = random.randint(1, int(max_iters)) if stochastic_max_iters else int(max_iters)
    method = _arg(solver_args, "solver", "choosing the solver")
    if method not in _SOLVER_FIELDS:
        if method == "broyden":
            raise NotImplementedError("ldeq_fast.compat.published.root_solver provides the published 'anderson' "
                                      "and 'fpi' solvers; the published 'broyden' is not reimplemented")
        raise ValueError(f"unknown solver {method!r}: expected 'anderson' or 'fpi'")
    stop_mode, tol = _tolerance(solver_args)
    _check_state(x0, "x0")
    verbose = bool(getattr(solver_args, "verbose_solver", False))
    if verbose:
        print(f"----- SOLVER: {method} {name} mi={max_iters}")
    backend = requested_backend(backend)
    if save_trajectory and backend != "torch":
        if backend != "auto":
            raise ValueError(f"save_trajectory needs the plain published solver (backend 'torch'): the fused engine "
                             f"(backend {backend!r}) keeps no iterates")
        warn_once("published-trajectory", "ldeq_fast: save_trajectory runs the plain published solver "
                  "(backend 'torch'; the fused engine keeps no iterates)")
        backend = "torch"
    kw = {}
    if method == "anderson":
        m, lam, beta = (_arg(solver_args, k, "solver='anderson'") for k in _SOLVER_FIELDS["anderson"])
        kw = dict(m=int(m), lam=float(lam), beta=float(beta))
    if save_trajectory:  # the plain published solvers keep the iterates
        if method == "anderson":
            solution, stats = anderson_published(f, x0, max_iters, tol, stop_mode, kw["m"], kw["lam"], kw["beta"],
                                                 save_trajectory=True)
        else:
            solution, stats = fixed_point_published(f, x0, max_iters, tol, stop_mode, save_trajectory=True)
        note("solver", stats.backend)
    else:
        solution, stats = solve(f, x0, method=method, max_iter=max_iters, tol=tol, stop_mode=stop_mode,
                                semantics="published", backend=backend, **kw)
    stats.extra = _host_extras(stats)
    if method == "anderson":
        final_abs, final_rel = min(stats.extra["trace_abs"]), min(stats.extra["trace_rel"])
    else:
        final_abs, final_rel = stats.extra["trace_abs"][-1], stats.extra["trace_rel"][-1]
    if verbose:
        print(f"      {name}: {stats.extra['n_iters']} iterations, abs diff {final_abs:.2E}, rel diff {final_rel:.2E}")
    logs = {"n_iters": stats.extra["n_iters"], "final_abs_diff": final_abs, "final_rel_diff": final_rel,
            "stability": stats.extra["stability"], "trajectory": stats.extra["trajectory"], "max_iters": max_iters}
    return solution, logs, stats


def weights_init(m: torch.nn.Module) -> None:
    """The published per-module initialisation, for ``model.apply(weights_init)``."""
    if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) and m.weight is not None:
        torch.nn.init.ones_(m.weight)
        torch.nn.init.zeros_(m.bias)


def _fpi_final_error(z_new: torch.Tensor, z_star: torch.Tensor) -> float:
    # whole-batch norms, as the published model logs it after its extra step
    return float(torch.norm(z_new - z_star) / (torch.norm(z_new) + 1e-9))


class LDEQ(_LDEQ):
    """Published-compatible LDEQ: ``LDEQ(args)``, ``forward(x, mode, args, z0, save_trajectory)`` -> dict.

    ``fast=True`` (or ``args.ldeq_fast_semantics='per_sample'`` at call time) uses ldeq_fast's per-sample
    solver on ``backend``; otherwise the published solver semantics are reproduced exactly.  The last
    forward's ``SolverStats`` is kept in ``self.last_stats``.
    """

    def __init__(self, args, fast: bool = False, backend: str = "auto"):
        cfg = published_args_to_config(args, solver_semantics="per_sample" if fast else "published", backend=backend)
        super().__init__(cfg)
        self.args = args
        self.fast = fast
        self.last_stats = None

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but a key the model needs and the checkpoint lacks is an error even with
        ``strict=False`` (the published scripts pass it; a missing weight would silently stay random),
        and ignored extra keys are named in a warning.  A DataParallel 'module.' prefix is stripped."""
        sd = _strip_prefix(dict(state_dict))
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise CheckpointError(f"state_dict lacks {len(missing)} key(s) of the model, which would keep their "
                                  f"random initialisation: {missing}")
        unexpected = sorted(set(sd) - set(own))
        if unexpected and not strict:
            warnings.warn(f"ignoring {len(unexpected)} state_dict key(s) the model does not have: {unexpected}",
                          stacklevel=2)
            sd = {k: v for k, v in sd.items() if k in own}
        for k, v in sd.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"state_dict parameter {k} contains NaN or inf")
        return super().load_state_dict(sd, strict=strict, assign=assign)

    # ------------------------------------------------------------------ forward
    def _depths(self, args) -> tuple[int, int]:
        """(forward, backward) solver depths by the model's rule (config.forward_depth / backward_depth:
        the published DEQ layer's), read from ``args`` at call time; the forward one is drawn here when
        training with stochastic_max_iters."""
        mi, stochastic = int(args.max_iters), bool(getattr(args, "stochastic_max_iters", False))
        return (forward_depth(mi, stochastic, self.training),
                backward_depth(mi, stochastic, self.cfg.backward_max_iters))

    def _settings(self, args, max_iters: int, semantics: str) -> SolverSettings:
        """The solver settings of ``args`` read now (the RwR recipe changes them between calls), through the
        model's config."""
        stop_mode, tol = _tolerance(args)
        cfg = self.cfg.replace(solver=args.solver, stop_mode=stop_mode, **{f"{stop_mode}_tol": tol},
                               anderson_m=int(getattr(args, "anderson_m", 6)),
                               anderson_lam=float(getattr(args, "anderson_lam", 1e-4)),
                               anderson_beta=float(getattr(args, "anderson_beta", 1.0)), solver_semantics=semantics)
        return SolverSettings.from_config(cfg, max_iters)

    def _implicit_published(self, f, z0, args, save_trajectory):
        zs = z0.shape
        solver_shape = (zs[0], z0[0].numel(), 1)

        def func(v):
            return f(v.view(zs)).view(solver_shape)

        max_iters, backward_iters = self._depths(args)
        with torch.no_grad():
            z_star, logs, stats = _root_solve(func, z0.reshape(solver_shape), max_iters, args, False,
                                              save_trajectory, "forward", self.cfg.backend)
        if self.training and torch.is_grad_enabled():
            z_star = z_star.detach().requires_grad_()
            z_new = func(z_star)  # the one tracked step
            if args.solver == "fpi":
                logs["final_solver_error"] = _fpi_final_error(z_new.detach(), z_star.detach())
            if not getattr(args, "JFB", False):
                settings = self._settings(args, backward_iters, "published")
                z_new = _ImplicitGrad.apply(z_new, z_star, settings, self.backward_log)
        elif self.training or not getattr(args, "take_one_less_inference_step", False):
            with torch.no_grad():
                z_new = func(z_star)
            if args.solver == "fpi":
                logs["final_solver_error"] = _fpi_final_error(z_new, z_star)
        else:
            z_new = z_star
        trajectory = []
        if save_trajectory:  # the published model moves the iterates out of the logs, z0 first
            trajectory = [z0] + [t.view(zs) for t in logs.pop("trajectory")]
        return z_new.view(zs), logs, trajectory, stats

    def _implicit_fast(self, f, z0, args):
        max_iters, backward_iters = self._depths(args)
        settings = self._settings(args, max_iters, "per_sample")
        bwd = self._settings(args, backward_iters, "per_sample")
        grad_mode = "jfb" if getattr(args, "JFB", False) else self.cfg.grad_mode
        extra = self.training or not getattr(args, "take_one_less_inference_step", False)
        z, stats = deq_fixed_point(f, z0, settings, grad_mode=grad_mode, extra_step=extra, backward_settings=bwd,
                                   phantom_steps=self.cfg.phantom_steps, phantom_damping=self.cfg.phantom_damping,
                                   log=self.backward_log)
        # stability as the published logs define it, on the batch-mean of the stop-mode residual trace
        mean_trace = [v for v in torch.nanmean(stats.trace.float(), dim=1).tolist() if not math.isnan(v)]
        stable = int(all(b <= a for a, b in zip(mean_trace, mean_trace[1:])))
        logs = {"n_iters": int(stats.nstep.max()), "final_abs_diff": float(stats.abs_residual.float().mean()),
                "final_rel_diff": float(stats.rel_residual.float().mean()), "stability": stable,
                "trajectory": [], "max_iters": max_iters}
        return z, logs, stats

    def forward(self, x, mode="implicit", args=None, z0=None, save_trajectory=False):
        """The published forward.  ``args`` defaults to the constructor's namespace; ``z0`` to zeros and may
        be (B, z_width, H, W) or the solver's (B, D, 1) view.  Returns a dict with ``keypoints`` (B, K, 2),
        ``uncertainty`` (B, K, the published formula), ``fwd_logs`` (None in explicit mode), ``z_star``
        (detached (B, z_width, H, W)) and ``trajectory`` (list; empty unless ``save_trajectory``)."""
        args = self.args if args is None else args
        if mode not in ("implicit", "explicit"):
            raise ValueError(f"mode must be 'implicit' or 'explicit', not {mode!r}")
        zs = self.z_shape(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None
        if z0 is not None and zs is not None:
            if z0.numel() != math.prod(zs):
                raise ValueError(f"z0 must have shape {zs} (or its (B, D, 1) view), got {tuple(z0.shape)}")
            z0 = z0.reshape(zs)
        x = self.check_inputs(x, z0)
        fast = self.fast or getattr(args, "ldeq_fast_semantics", "published") == "per_sample"
        if fast and save_trajectory and mode == "implicit":
            raise ValueError("save_trajectory needs the published solver semantics (fast=False): the per-sample "
                             "solver does not keep its iterates")
        with numerics.cpu_bf16_guard(x.device.type):
            return self._forward(x, mode, args, z0, save_trajectory, fast)

    def _forward(self, x, mode, args, z0, save_trajectory, fast):
        injection = self.injection(x)
        z0 = self.zeros_z0(x) if z0 is None else numerics.to_state(z0, self.state_dtype)
        f = self.cell_fn(injection)
        logs, trajectory, self.last_stats = None, [], None
        if mode == "explicit":
            z = z0
            trajectory = [z0] if save_trajectory else []
            for _ in range(int(args.explicit_depth)):
                z = f(z)
                if save_trajectory:
                    trajectory.append(z.detach())
        elif fast:
            z, logs, self.last_stats = self._implicit_fast(f, z0, args)
        else:
            z, logs, trajectory, self.last_stats = self._implicit_published(f, z0, args, save_trajectory)
        keypoints, _, uncertainty = heatmap_keypoints_ref(self.heatmaps_from_z(z))
        return {"keypoints": keypoints, "uncertainty": uncertainty, "fwd_logs": logs, "z_star": z.detach(),
                "trajectory": trajectory}
