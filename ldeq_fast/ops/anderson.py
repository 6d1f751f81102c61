"""Fused Anderson-acceleration ops: the three per-iteration steps of the fused solver engine
(ldeq_fast/solvers/fused.py).

State per solve (B samples of D values, history length m, acc = float64 for float64 state, else float32):
  F, G   (B, m, D) state dtype   ring buffers of images f(x_j) and residuals g_j = f(x_j) - x_j
  gram   (B, m, m) acc           <g_i, g_j>, kept up to date one row/column per iteration
  flags  (4, B) bool             rows: active, converged, diverged, improved (this iteration)
  stat   (4, B) acc              rows: best residual, its abs residual, its rel residual, first residual
  nstep  (B,) int64, trace (T, B) acc, x and best (B, D) state dtype

Per iteration k (slot s = k % m, n = min(k + 1, m) valid slots):
  norms = anderson_update(fx, x, F, G, gram, active, s, n)   one pass over D
  alpha = anderson_step(gram, norms, flags, stat, nstep, trace, k, n, ..., policy)   per sample, tiny
  anderson_mix(F, G, alpha, flags, x, best, s, n, beta, mix, best_from_x)   one pass over D

``norms`` (B, 3) = (||g||^2, ||fx||^2, ||fx + 1e-5||^2): the last is the published relative residual's
denominator (the 1e-5 added elementwise before the norm), one more accumulator in the same pass.

``policy`` of anderson_step (the solver policy; the kernels are the same otherwise):
  POLICY_PER_SAMPLE (0)   per-sample stopping, divergence freezing, best = the image f(x) with the lowest
                          residual of the sample (ldeq_fast/solvers/reference.py);
  POLICY_PUBLISHED_ANDERSON (1)  the published Anderson (ldeq_fast/solvers/published.py): residual
                          rel = ||g|| / ||fx + 1e-5||; iterations k >= 2 count (the published code's first
                          recorded residual is that of its X_2 = the engine's x_2); stop every sample when the
                          *batch mean* of the stop-mode residual < tol; best = the iterate x (not fx, so the
                          mix is called with best_from_x=True) with the lowest batch mean, ties keep the
                          earlier, the first counted one always taken; no divergence freezing.
                          stat rows 0/1/2 hold the lowest batch means of the stop mode / abs / rel (each
                          tracked on its own, as the published code does); trace[k] the batch mean.
  POLICY_PUBLISHED_FPI (2)  the published fixed-point iteration: rel = ||g|| / (||fx|| + 1e-5), every
                          iteration counts, batch-mean stop, best = the last image (improved every counted
                          iteration); stat rows 0/1/2 the last batch means.
The batch means are over all B samples (in a published solve every sample is active or none is).

Each is one op, ``torch.ops.ldeq_fast.anderson_{update,step,mix}``: CPU kernel csrc/cpu/anderson.cpp, CUDA
kernel kernels/anderson_{update,step,mix}.py (Triton), references ``anderson_*_ref`` below (the oracle of the
tests).  The ops mutate the solver state in place (alias-annotated schemas) and have no autograd: the solve
runs under no_grad.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldeq_fast.ops import define, load_triton_kernels, resolve, triton_launcher

MAX_M = 64  # the C++ small solve uses stack arrays of this size
POLICY_PER_SAMPLE, POLICY_PUBLISHED_ANDERSON, POLICY_PUBLISHED_FPI = 0, 1, 2
POLICIES = (POLICY_PER_SAMPLE, POLICY_PUBLISHED_ANDERSON, POLICY_PUBLISHED_FPI)
PUBLISHED_EPS = 1e-5  # the published residual's eps (both solvers)
_STATE_DTYPES = (torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the Gram matrix, norms and statistics for a state dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------
# argument checks (shared by every backend; the C++ kernels repeat them)

def _need(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {msg}")


def _check_ring(op, F, G, x):
    _need(x.dim() == 2, op, f"x must be (B, D), got shape {tuple(x.shape)}")
    if x.dtype not in _STATE_DTYPES:
        raise TypeError(f"{op}: supports float32 and float64 state, got {x.dtype}")
    B, D = x.shape
    _need(F.dim() == 3 and F.shape[0] == B and F.shape[2] == D and F.shape[1] >= 1, op,
          f"F must be (B, m, D) = ({B}, m, {D}), got {tuple(F.shape)}")
    _need(G.shape == F.shape, op, f"G must have F's shape {tuple(F.shape)}, got {tuple(G.shape)}")
    if F.dtype != x.dtype or G.dtype != x.dtype:
        raise TypeError(f"{op}: F, G and x must share a dtype, got {F.dtype}, {G.dtype}, {x.dtype}")
    _need(x.is_contiguous() and F.is_contiguous() and G.is_contiguous(), op, "x, F and G must be contiguous")
    _need(F.device == x.device and G.device == x.device, op, "x, F and G must be on one device")


def _check_slots(op, slot, n, m):
    _need(m <= MAX_M, op, f"history length m={m} exceeds the supported maximum {MAX_M}")
    _need(0 <= slot < m, op, f"slot {slot} out of range for m={m}")
    _need(1 <= n <= m and slot < n, op, f"need 1 <= n <= m and slot < n, got n={n}, slot={slot}, m={m}")


def _check_flags(op, flags, B):
    _need(flags.dtype == torch.bool and tuple(flags.shape) == (4, B) and flags.is_contiguous(), op,
          f"flags must be a contiguous bool (4, B={B}) tensor [active, converged, diverged, improved], "
          f"got {flags.dtype} {tuple(flags.shape)}")


def _check_acc(op, name, t, shape, acc):
    _need(t.dtype == acc and tuple(t.shape) == tuple(shape) and t.is_contiguous(), op,
          f"{name} must be a contiguous {acc} {tuple(shape)} tensor, got {t.dtype} {tuple(t.shape)}")


def check_update_args(fx, x, F, G, gram, active, slot, n):
    op = "anderson_update"
    _check_ring(op, F, G, x)
    B, m = x.shape[0], F.shape[1]
    _check_slots(op, slot, n, m)
    _need(fx.shape == x.shape, op, f"fx must have x's shape {tuple(x.shape)}, got {tuple(fx.shape)}")
    if fx.dtype != x.dtype:
        raise TypeError(f"{op}: fx dtype {fx.dtype} differs from the solver state's {x.dtype}")
    _need(fx.is_contiguous() and fx.device == x.device, op, "fx must be contiguous and on x's device")
    _check_acc(op, "gram", gram, (B, m, m), acc_dtype(x.dtype))
    _need(active.dtype == torch.bool and tuple(active.shape) == (B,) and active.is_contiguous(), op,
          "active must be a contiguous bool (B,) tensor")


def check_step_args(gram, norms, flags, stat, nstep, trace, k, n, lam, policy=POLICY_PER_SAMPLE):
    op = "anderson_step"
    _need(gram.dim() == 3 and gram.shape[1] == gram.shape[2] and gram.is_contiguous(), op,
          f"gram must be a contiguous (B, m, m) tensor, got {tuple(gram.shape)}")
    B, m = gram.shape[0], gram.shape[1]
    acc = gram.dtype
    if acc not in _STATE_DTYPES:
        raise TypeError(f"{op}: gram must be float32 or float64, got {acc}")
    _need(k >= 0, op, f"iteration k must be >= 0, got {k}")
    _check_slots(op, k % m, n, m)
    _need(lam >= 0 and lam != float("inf"), op, f"lam must be finite and >= 0, got {lam}")
    _need(policy in POLICIES, op, f"policy must be one of {POLICIES} (per-sample, published anderson, published "
          f"fpi), got {policy}")
    _check_flags(op, flags, B)
    _check_acc(op, "norms", norms, (B, 3), acc)
    _check_acc(op, "stat", stat, (4, B), acc)
    _need(nstep.dtype == torch.int64 and tuple(nstep.shape) == (B,) and nstep.is_contiguous(), op,
          "nstep must be a contiguous int64 (B,) tensor")
    _need(trace.dtype == acc and trace.dim() == 2 and trace.shape[1] == B and trace.shape[0] > k
          and trace.is_contiguous(), op, f"trace must be a contiguous {acc} (T > k, B) tensor, got {tuple(trace.shape)}")


def check_mix_args(F, G, alpha, flags, x, best, slot, n, beta):
    op = "anderson_mix"
    _check_ring(op, F, G, x)
    B, m = x.shape[0], F.shape[1]
    _check_slots(op, slot, n, m)
    _check_flags(op, flags, B)
    _need(best.shape == x.shape and best.dtype == x.dtype and best.is_contiguous(), op,
          f"best must be a contiguous tensor like x {tuple(x.shape)}, got {tuple(best.shape)}")
    _check_acc(op, "alpha", alpha, (B, m), acc_dtype(x.dtype))
    _need(beta == beta and abs(beta) != float("inf"), op, f"beta must be finite, got {beta}")


# --------------------------------------------------------------------------------------------------------
# PyTorch references (in-place on the state, like the kernels)

def anderson_update_ref(fx, x, F, G, gram, active, slot: int, n: int) -> torch.Tensor:
    """F[:, s] = fx, G[:, s] = fx - x, Gram row/column s over the n valid slots, for active samples.
    Returns norms (B, 3) = (||g||^2, ||fx||^2, ||fx + 1e-5||^2), zero for inactive samples.  Sums in
    float64 (fx + 1e-5 rounded in the state's dtype first, as the published code adds it)."""
    act = active[:, None]
    g = fx - x
    F[:, slot] = torch.where(act, fx, F[:, slot])
    G[:, slot] = torch.where(act, g, G[:, slot])
    dots = torch.einsum("bd,bjd->bj", g.double(), G[:, :n].double())  # column s is ||g||^2
    ff = fx.double().square().sum(1)
    fe = (fx + PUBLISHED_EPS).double().square().sum(1)
    new = dots.to(gram.dtype)
    gram[:, slot, :n] = torch.where(act, new, gram[:, slot, :n])
    gram[:, :n, slot] = torch.where(act, new, gram[:, :n, slot])
    norms = torch.stack([dots[:, slot], ff, fe], 1).to(gram.dtype)
    return torch.where(act, norms, torch.zeros_like(norms))


def anderson_weights_from_gram(gram: torch.Tensor, n: int, slot: int, lam: float, lam_scaled: bool) -> torch.Tensor:
    """Anderson weights (B, m) in float64 from the Gram matrix's first n slots: alpha = w / sum(w) with
    (Gram + reg I) w = 1 (the bordered system's solution), zero for invalid slots.  Solved by Gaussian
    elimination without pivoting, as the kernels do (the matrix is SPD for reg > 0); where a pivot is not
    positive (reg = 0 and a rank-deficient history) alpha = e_slot, a plain fixed-point step."""
    B, m, _ = gram.shape
    H = gram[:, :n, :n].double()
    if lam_scaled:
        reg = lam * torch.diagonal(H, dim1=1, dim2=2).amax(1).clamp_min(1e-30)
    else:
        reg = torch.full((B,), float(lam), dtype=torch.float64, device=gram.device)
    H = H + reg[:, None, None] * torch.eye(n, dtype=torch.float64, device=gram.device)
    w = torch.ones(B, n, dtype=torch.float64, device=gram.device)
    ok = torch.ones(B, dtype=torch.bool, device=gram.device)
    for p in range(n):
        piv = H[:, p, p]
        ok &= (piv > 0) & torch.isfinite(piv)
        f = H[:, p + 1:, p] / piv[:, None]
        H[:, p + 1:, p:] -= f[:, :, None] * H[:, p:p + 1, p:]
        w[:, p + 1:] -= f * w[:, p:p + 1]
    for r in range(n - 1, -1, -1):
        w[:, r] = (w[:, r] - (H[:, r, r + 1:] * w[:, r + 1:]).sum(1)) / H[:, r, r]
    s = w.sum(1, keepdim=True)
    ok = ok[:, None] & torch.isfinite(s) & (s != 0)
    fallback = torch.zeros(n, dtype=torch.float64, device=gram.device)
    fallback[slot] = 1.0
    alpha = torch.zeros(B, m, dtype=torch.float64, device=gram.device)
    alpha[:, :n] = torch.where(ok, w / s, fallback)
    if n == 1:
        alpha[:, 0] = 1.0
    return alpha


def _published_step_ref(gram, norms, flags, stat, nstep, trace, k, n, tol, stop_rel, lam, lam_scaled, policy):
    act = flags[0].clone()
    abs_r = norms[:, 0].sqrt()
    if policy == POLICY_PUBLISHED_ANDERSON:
        rel_r = abs_r / norms[:, 2].sqrt()
    else:
        rel_r = abs_r / (norms[:, 1].sqrt() + PUBLISHED_EPS)
    # batch means, summed and divided in float64 then rounded to the statistics' dtype (so every
    # backend's summation order gives the same value in all but the rarest cases)
    B = abs_r.shape[0]
    mean_abs = (abs_r.double().sum() / B).to(abs_r.dtype)
    mean_rel = (rel_r.double().sum() / B).to(rel_r.dtype)
    mres = mean_rel if stop_rel else mean_abs
    counted = act & (k >= (2 if policy == POLICY_PUBLISHED_ANDERSON else 0))
    if policy == POLICY_PUBLISHED_ANDERSON:
        first = k == 2
        imp = counted & ((mres < stat[0]) | first)
        imp_abs = counted & ((mean_abs < stat[1]) | first)
        imp_rel = counted & ((mean_rel < stat[2]) | first)
    else:
        imp = imp_abs = imp_rel = counted
    stat[0] = torch.where(imp, mres, stat[0])
    stat[1] = torch.where(imp_abs, mean_abs, stat[1])
    stat[2] = torch.where(imp_rel, mean_rel, stat[2])
    nstep += act.long()
    trace[k] = torch.where(counted, mres, torch.full_like(mres, float("nan")))
    below = counted & (mres < tol)
    flags[1] |= below
    flags[0] = act & ~below
    flags[3] = imp
    alpha = anderson_weights_from_gram(gram, n, k % gram.shape[1], lam, lam_scaled).to(gram.dtype)
    return torch.where(flags[0][:, None], alpha, torch.zeros_like(alpha))


def anderson_step_ref(gram, norms, flags, stat, nstep, trace, k: int, n: int, tol: float, stop_rel: bool,
                      lam: float, lam_scaled: bool, divergence_factor: float,
                      policy: int = POLICY_PER_SAMPLE) -> torch.Tensor:
    """Bookkeeping of iteration k (residual, divergence, best, stop masks, stats: per sample, see
    ldeq_fast/solvers/reference.py, or batch-mean under a published ``policy``, see the module doc) and the
    Anderson weights (B, m) for the samples still active."""
    if policy != POLICY_PER_SAMPLE:
        return _published_step_ref(gram, norms, flags, stat, nstep, trace, k, n, tol, stop_rel, lam, lam_scaled,
                                   policy)
    act = flags[0].clone()
    abs_r = norms[:, 0].sqrt()
    rel_r = abs_r / (norms[:, 1].sqrt() + 1e-5)
    res = rel_r if stop_rel else abs_r
    if k == 0:
        stat[3] = torch.where(act, res, stat[3])
    bad = ~torch.isfinite(res) | (res > divergence_factor * stat[3].clamp_min(1e-30))
    below = res < tol
    improved = act & ~bad & (res < stat[0])
    stat[0] = torch.where(improved, res, stat[0])
    stat[1] = torch.where(improved, abs_r, stat[1])
    stat[2] = torch.where(improved, rel_r, stat[2])
    nstep += act.long()
    trace[k] = torch.where(act, res, torch.full_like(res, float("nan")))
    flags[2] |= act & bad
    flags[1] |= act & ~bad & below
    flags[0] = act & ~bad & ~below
    flags[3] = improved
    alpha = anderson_weights_from_gram(gram, n, k % gram.shape[1], lam, lam_scaled).to(gram.dtype)
    return torch.where(flags[0][:, None], alpha, torch.zeros_like(alpha))


def anderson_mix_ref(F, G, alpha, flags, x, best, slot: int, n: int, beta: float, mix: bool,
                     best_from_x: bool = False) -> None:
    """best = F[:, s] (or, with ``best_from_x``, the iterate x before this mix) where improved; if ``mix``:
    x = sum_{j<n} alpha_j (F_j - (1 - beta) G_j) where active."""
    best.copy_(torch.where(flags[3][:, None], x if best_from_x else F[:, slot], best))
    if mix:
        hist = F[:, :n] if beta == 1.0 else F[:, :n] - (1.0 - beta) * G[:, :n]
        x_new = torch.einsum("bj,bjd->bd", alpha[:, :n].to(x.dtype), hist)
        x.copy_(torch.where(flags[0][:, None], x_new, x))


# --------------------------------------------------------------------------------------------------------
# the ops

def _update_fake(fx, x, F, G, gram, active, slot, n):
    return gram.new_empty(x.shape[0], 3)


def _step_fake(gram, norms, flags, stat, nstep, trace, k, n, tol, stop_rel, lam, lam_scaled, divergence_factor,
               policy=POLICY_PER_SAMPLE):
    return gram.new_empty(gram.shape[0], gram.shape[1])


def _mix_fake(F, G, alpha, flags, x, best, slot, n, beta, mix, best_from_x=False):
    return None


UPDATE = define("anderson_update", "(Tensor fx, Tensor x, Tensor(a!) F, Tensor(b!) G, Tensor(c!) gram, Tensor active, "
                "int slot, int n) -> Tensor", fake=_update_fake, cuda=triton_launcher("anderson_update", "anderson_update"))
STEP = define("anderson_step", "(Tensor gram, Tensor norms, Tensor(a!) flags, Tensor(b!) stat, Tensor(c!) nstep, "
              "Tensor(d!) trace, int k, int n, float tol, bool stop_rel, float lam, bool lam_scaled, "
              "float divergence_factor, int policy=0) -> Tensor", fake=_step_fake, cuda=triton_launcher("anderson_step", "anderson_step"))
MIX = define("anderson_mix", "(Tensor F, Tensor G, Tensor alpha, Tensor flags, Tensor(a!) x, Tensor(b!) best, int slot, "
             "int n, float beta, bool mix, bool best_from_x=False) -> ()", fake=_mix_fake, cuda=triton_launcher("anderson_mix", "anderson_mix"))


# --------------------------------------------------------------------------------------------------------
# dispatch

@dataclass(frozen=True)
class AndersonOps:
    """The three ops of one backend, unchecked (the engine builds consistent state once)."""
    backend: str
    update: Callable
    step: Callable
    mix: Callable


def ops_for(backend: str, device_type: str = "cuda") -> AndersonOps:
    """Ops for a backend already resolved by ``resolve`` ('cpp' | 'triton' | 'torch').  Outside torch.compile
    the Triton launchers are called directly (the dispatcher's Python layers cost tens of microseconds per
    call); the Triton interpreter path (CPU tensors) always calls them directly."""
    if backend == "cpp" or (backend == "triton" and device_type != "cpu" and torch.compiler.is_compiling()):
        return AndersonOps(backend, UPDATE, STEP, MIX)
    if backend == "triton":
        return AndersonOps("triton", load_triton_kernels("anderson_update").anderson_update,
                           load_triton_kernels("anderson_step").anderson_step,
                           load_triton_kernels("anderson_mix").anderson_mix)
    if backend == "torch":
        return AndersonOps("torch", anderson_update_ref, anderson_step_ref, anderson_mix_ref)
    raise ValueError(f"no Anderson ops for backend {backend!r}")


OPS = ("anderson_update", "anderson_step", "anderson_mix")


def resolve_backend(t: torch.Tensor, backend: str | None = None) -> str:
    """The one backend the solver's three Anderson ops run on for state ``t``."""
    chosen = {resolve(op, t, backend) for op in OPS}
    if len(chosen) > 1:
        raise RuntimeError(f"the Anderson ops would run on different backends {sorted(chosen)}: ldeq_fast._C was "
                           "built from older sources; rebuild it")
    return chosen.pop()


def _ops(t: torch.Tensor, backend: str | None, op: str) -> AndersonOps:
    return ops_for(resolve(op, t, backend), t.device.type)


def anderson_update(fx, x, F, G, gram, active, slot: int, n: int, backend: str | None = None) -> torch.Tensor:
    """Write F[:, slot] = fx and G[:, slot] = fx - x and the Gram row/column ``slot`` (over the first n
    slots) for the active samples; return norms (B, 3) = (||fx - x||^2, ||fx||^2, ||fx + 1e-5||^2), 0 where
    inactive."""
    check_update_args(fx, x, F, G, gram, active, slot, n)
    return _ops(x, backend, "anderson_update").update(fx, x, F, G, gram, active, slot, n)


def anderson_step(gram, norms, flags, stat, nstep, trace, k: int, n: int, tol: float, stop_rel: bool, lam: float,
                  lam_scaled: bool, divergence_factor: float, policy: int = POLICY_PER_SAMPLE,
                  backend: str | None = None) -> torch.Tensor:
    """Bookkeeping of iteration k for every sample (updates flags, stat, nstep, trace in place) and the
    Anderson weights alpha (B, m) (zero for samples no longer active); ``policy``: see the module doc."""
    check_step_args(gram, norms, flags, stat, nstep, trace, k, n, lam, policy)
    return _ops(gram, backend, "anderson_step").step(gram, norms, flags, stat, nstep, trace, k, n, float(tol),
                                                     bool(stop_rel), float(lam), bool(lam_scaled),
                                                     float(divergence_factor), int(policy))


def anderson_mix(F, G, alpha, flags, x, best, slot: int, n: int, beta: float, mix: bool = True,
                 best_from_x: bool = False, backend: str | None = None) -> None:
    """best = F[:, slot] (or the iterate x before the mix, ``best_from_x``) where improved; if ``mix``,
    x = sum_j alpha_j (F_j - (1 - beta) G_j) where active."""
    check_mix_args(F, G, alpha, flags, x, best, slot, n, beta)
    _ops(x, backend, "anderson_mix").mix(F, G, alpha, flags, x, best, slot, n, float(beta), bool(mix),
                                         bool(best_from_x))
