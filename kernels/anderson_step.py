"""Triton kernel for ``anderson_step``: per-sample bookkeeping and the Anderson weights, one program
per sample (see ldeq_fast/ops/anderson.py for the op's contract).

The weights solve (Gram + reg I) w = 1 over the n valid slots by Gauss-Jordan elimination in fp64 on
a padded (MP, MP) tile (invalid slots are identity rows, so their weight is 0), then alpha = w / sum(w)
-- the bordered system's solution.  The matrix is symmetric positive definite for reg > 0, so no
pivoting is needed; a non-positive pivot (reg = 0, rank-deficient history) falls back to the plain
fixed-point step alpha = e_slot, as the C++ kernel does.

Under a published POLICY (see ldeq_fast/ops/anderson.py) every program loads all B samples' norms and
computes the batch means itself (in fp64, a fixed tree order: no cross-program communication), then does
its own sample's bookkeeping from them.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _residuals(gg, ff, fe, ANDERSON_EPS_INSIDE: tl.constexpr, IS_FP64: tl.constexpr):
    """(abs, rel) residuals in the state's precision, correctly rounded, as the reference computes them;
    rel = abs / ||fx + 1e-5|| (published Anderson) or abs / (||fx|| + 1e-5)."""
    if IS_FP64:  # fp64 sqrt and division are IEEE-rounded already
        abs_r = tl.sqrt(gg)
        if ANDERSON_EPS_INSIDE:
            rel_r = abs_r / tl.sqrt(fe)
        else:
            rel_r = abs_r / (tl.sqrt(ff) + 1e-5)
    else:
        abs_r = tl.sqrt_rn(gg)
        if ANDERSON_EPS_INSIDE:
            rel_r = tl.div_rn(abs_r, tl.sqrt_rn(fe))
        else:
            rel_r = tl.div_rn(abs_r, tl.sqrt_rn(ff) + 1e-5)
    return abs_r, rel_r


@triton.jit(do_not_specialize=["B", "m", "k", "n", "slot"])
def _step_kernel(gram_ptr, norms_ptr, flags_ptr, stat_ptr, nstep_ptr, trace_ptr, alpha_ptr,
                 B, m, k, n, slot, tol_hi, tol_lo, lam_hi, lam_lo, div_hi, div_lo,
                 STOP_REL: tl.constexpr, LAM_SCALED: tl.constexpr, MP: tl.constexpr, IS_FP64: tl.constexpr,
                 POLICY: tl.constexpr, BP: tl.constexpr):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    # float scalars arrive as fp32: each fp64 parameter is passed as an fp32 (hi, lo) pair
    tol = tl.cast(tol_hi, tl.float64) + tl.cast(tol_lo, tl.float64)
    lam = tl.cast(lam_hi, tl.float64) + tl.cast(lam_lo, tl.float64)
    divergence_factor = tl.cast(div_hi, tl.float64) + tl.cast(div_lo, tl.float64)
    act = tl.load(flags_ptr + b) != 0
    was_conv = tl.load(flags_ptr + B + b) != 0
    was_div = tl.load(flags_ptr + 2 * B + b) != 0
    if POLICY == 0:  # per sample
        gg = tl.load(norms_ptr + b64 * 3)
        ff = tl.load(norms_ptr + b64 * 3 + 1)
        abs_r, rel_r = _residuals(gg, ff, gg, False, IS_FP64)
        if STOP_REL:
            res = rel_r
        else:
            res = abs_r
        best_res = tl.load(stat_ptr + b)
        first_res = tl.load(stat_ptr + 3 * B + b)
        first_res = tl.where(act & (k == 0), res, first_res)
        finite = (res == res) & (tl.abs(res) < float("inf"))
        bad = (~finite) | (res > divergence_factor.to(res.dtype) * tl.maximum(first_res, 1e-30))
        below = res < tol.to(res.dtype)
        improved = act & (~bad) & (res < best_res)
        tl.store(stat_ptr + b, tl.where(improved, res, best_res))
        tl.store(stat_ptr + B + b, tl.where(improved, abs_r, tl.load(stat_ptr + B + b)))
        tl.store(stat_ptr + 2 * B + b, tl.where(improved, rel_r, tl.load(stat_ptr + 2 * B + b)))
        tl.store(stat_ptr + 3 * B + b, first_res)
        tl.store(nstep_ptr + b, tl.load(nstep_ptr + b) + act.to(tl.int64))
        tl.store(trace_ptr + k * B + b, tl.where(act, res, float("nan")))
        still = act & (~bad) & (~below)
        tl.store(flags_ptr + b, still)
        tl.store(flags_ptr + B + b, was_conv | (act & (~bad) & below))
        tl.store(flags_ptr + 2 * B + b, was_div | (act & bad))
        tl.store(flags_ptr + 3 * B + b, improved)
    else:  # published: batch means over all B samples decide for the batch
        bi = tl.arange(0, BP)
        inb = bi < B
        gg_all = tl.load(norms_ptr + bi.to(tl.int64) * 3, mask=inb, other=1.0)
        ff_all = tl.load(norms_ptr + bi.to(tl.int64) * 3 + 1, mask=inb, other=1.0)
        fe_all = tl.load(norms_ptr + bi.to(tl.int64) * 3 + 2, mask=inb, other=1.0)
        abs_all, rel_all = _residuals(gg_all, ff_all, fe_all, POLICY == 1, IS_FP64)
        # summed and divided in fp64, then rounded to the statistics' dtype (as the reference)
        mean_abs = (tl.sum(tl.where(inb, abs_all.to(tl.float64), 0.0), axis=0) / B).to(abs_all.dtype)
        mean_rel = (tl.sum(tl.where(inb, rel_all.to(tl.float64), 0.0), axis=0) / B).to(rel_all.dtype)
        if STOP_REL:
            mres = mean_rel
        else:
            mres = mean_abs
        if POLICY == 1:
            kfirst = 2
        else:
            kfirst = 0
        counted = act & (k >= kfirst)
        s0 = tl.load(stat_ptr + b)
        s1 = tl.load(stat_ptr + B + b)
        s2 = tl.load(stat_ptr + 2 * B + b)
        if POLICY == 1:  # lowest batch mean, ties keep the earlier, the first counted one always taken
            first = k == kfirst
            improved = counted & ((mres < s0) | first)
            imp_abs = counted & ((mean_abs < s1) | first)
            imp_rel = counted & ((mean_rel < s2) | first)
        else:  # the last one
            improved = counted
            imp_abs = counted
            imp_rel = counted
        tl.store(stat_ptr + b, tl.where(improved, mres, s0))
        tl.store(stat_ptr + B + b, tl.where(imp_abs, mean_abs, s1))
        tl.store(stat_ptr + 2 * B + b, tl.where(imp_rel, mean_rel, s2))
        tl.store(nstep_ptr + b, tl.load(nstep_ptr + b) + act.to(tl.int64))
        tl.store(trace_ptr + k * B + b, tl.where(counted, mres, float("nan")))
        below = counted & (mres < tol.to(mres.dtype))
        still = act & (~below)
        tl.store(flags_ptr + b, still)
        tl.store(flags_ptr + B + b, was_conv | below)
        tl.store(flags_ptr + 2 * B + b, was_div)
        tl.store(flags_ptr + 3 * B + b, improved)

    # Anderson weights (computed for every sample, kept only for those still active)
    i = tl.arange(0, MP)
    valid_r = i[:, None] < n
    valid_c = i[None, :] < n
    H = tl.load(gram_ptr + (b64 * m + i[:, None]) * m + i[None, :], mask=valid_r & valid_c, other=0.0)
    H = H.to(tl.float64)
    diag = i[:, None] == i[None, :]
    maxdiag = tl.max(tl.max(tl.where(diag & valid_r, H, 0.0), axis=1), axis=0)
    if LAM_SCALED:
        reg = lam * tl.maximum(maxdiag, 1e-30)
    else:
        reg = lam
    A = tl.where(valid_r & valid_c, H + tl.where(diag, reg, 0.0), tl.where(diag, 1.0, 0.0))
    r = tl.where(i < n, 1.0, 0.0).to(tl.float64)
    ok = n > 0
    for p in tl.static_range(MP):
        row_p = tl.sum(tl.where(i[:, None] == p, A, 0.0), axis=0)
        col_p = tl.sum(tl.where(i[None, :] == p, A, 0.0), axis=1)
        piv = tl.sum(tl.where(i == p, row_p, 0.0), axis=0)
        r_p = tl.sum(tl.where(i == p, r, 0.0), axis=0)
        ok = ok & (piv > 0) & (piv < float("inf"))
        safe = tl.where(piv > 0, piv, 1.0)
        f = tl.where(i == p, 0.0, col_p / safe)
        A = A - f[:, None] * row_p[None, :]
        r = r - f * r_p
    d = tl.sum(tl.where(diag, A, 0.0), axis=1)
    w = r / tl.where(d != 0, d, 1.0)
    s = tl.sum(w, axis=0)
    ok = ok & (s == s) & (tl.abs(s) < float("inf")) & (s != 0)
    alpha = tl.where(ok, w / tl.where(s != 0, s, 1.0), tl.where(i == slot, 1.0, 0.0))
    alpha = tl.where(i < n, alpha, 0.0)
    if n == 1:
        alpha = tl.where(i == 0, 1.0, 0.0).to(tl.float64)
    alpha = tl.where(still, alpha, 0.0)
    tl.store(alpha_ptr + b64 * m + i, alpha.to(alpha_ptr.dtype.element_ty), mask=i < m)


def _split(v: float) -> tuple[float, float]:
    """An fp64 value as fp32 (hi, lo) with hi + lo == v to ~48 bits (fp32-range values)."""
    with np.errstate(over="ignore"):  # beyond fp32 range: inf, as an fp32 comparison would see it
        hi = float(np.float32(v))
    if not np.isfinite(hi):
        return hi, 0.0
    return hi, float(np.float32(v - hi))


def anderson_step(gram: torch.Tensor, norms: torch.Tensor, flags: torch.Tensor, stat: torch.Tensor,
                  nstep: torch.Tensor, trace: torch.Tensor, k: int, n: int, tol: float, stop_rel: bool,
                  lam: float, lam_scaled: bool, divergence_factor: float, policy: int = 0) -> torch.Tensor:
    """Launch the step; arguments are validated by the caller (ldeq_fast.ops.anderson)."""
    B, m, _ = gram.shape
    alpha = torch.empty(B, m, dtype=gram.dtype, device=gram.device)
    MP = max(2, triton.next_power_of_2(m))
    BP = max(2, triton.next_power_of_2(B)) if policy else 1  # the batch-mean tile (published policies only)
    _step_kernel[(B,)](gram, norms, flags, stat, nstep, trace, alpha, B, m, k, n, k % m, *_split(tol), *_split(lam),
                       *_split(divergence_factor), STOP_REL=bool(stop_rel), LAM_SCALED=bool(lam_scaled), MP=MP, IS_FP64=gram.dtype == torch.float64,
                       POLICY=int(policy), BP=BP, num_warps=1)
    return alpha
