"""Triton kernel for ``anderson_update`` (see ldeq_fast/ops/anderson.py for the op's contract).

One pass over the (B, D) state: for each active sample write F[:, s] = fx and G[:, s] = g = fx - x,
and the per-block partial sums <g, G_j> (j < n; j = s gives ||g||^2), ||fx||^2 and ||fx + 1e-5||^2 (the
published relative residual's denominator; fx + 1e-5 rounded in the state's dtype, as published).  A second, tiny
kernel adds the blocks' partial sums in a fixed order (deterministic, no atomics) and writes the Gram
row/column s and the norms.  Products and sums are fp64: the Anderson weights are sensitive to the
Gram matrix when the residual history is nearly collinear, and in a bandwidth-bound pass the fp64
arithmetic is free on data-centre GPUs (and cheap elsewhere: ~2n flops per element moved).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from ldeq_fast.kernels.anderson_mix import pick_block


@triton.jit(do_not_specialize=["m", "slot", "n", "nblk"])
def _update_blocks_kernel(fx_ptr, x_ptr, F_ptr, G_ptr, active_ptr, part_ptr, D, m, slot, n, nblk,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    if tl.load(active_ptr + b):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        b64 = b.to(tl.int64)
        fx = tl.load(fx_ptr + b64 * D + offs, mask=mask, other=0.0)
        x = tl.load(x_ptr + b64 * D + offs, mask=mask, other=0.0)
        g = fx - x
        ring = b64 * m * D
        tl.store(F_ptr + ring + slot * D + offs, fx, mask=mask)
        tl.store(G_ptr + ring + slot * D + offs, g, mask=mask)
        ga = g.to(tl.float64)
        fa = fx.to(tl.float64)
        ea = tl.where(mask, fx + 1e-5, 0.0).to(tl.float64)
        out = part_ptr + (b64 * nblk + blk) * (m + 2)
        tl.store(out + slot, tl.sum(ga * ga, axis=0))
        tl.store(out + m, tl.sum(fa * fa, axis=0))
        tl.store(out + m + 1, tl.sum(ea * ea, axis=0))
        for j in range(0, n):
            if j != slot:
                gj = tl.load(G_ptr + ring + j * D + offs, mask=mask, other=0.0).to(tl.float64)
                tl.store(out + j, tl.sum(ga * gj, axis=0))


@triton.jit(do_not_specialize=["m", "slot", "n", "nblk"])
def _update_reduce_kernel(part_ptr, active_ptr, gram_ptr, norms_ptr, m, slot, n, nblk,
                          QP: tl.constexpr, RB: tl.constexpr):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    q = tl.arange(0, QP)
    act = tl.load(active_ptr + b)
    total = tl.zeros([QP], dtype=tl.float64)
    if act:
        for start in range(0, nblk, RB):
            r = start + tl.arange(0, RB)
            ptrs = part_ptr + (b64 * nblk + r[:, None]) * (m + 2) + q[None, :]
            written = (q[None, :] < n) | (q[None, :] == m) | (q[None, :] == m + 1)  # n..m-1 hold no sums
            vals = tl.load(ptrs, mask=(r[:, None] < nblk) & written, other=0.0)
            total += tl.sum(vals, axis=0)
        row = total.to(gram_ptr.dtype.element_ty)
        in_row = q < n
        tl.store(gram_ptr + (b64 * m + slot) * m + q, row, mask=in_row)
        tl.store(gram_ptr + (b64 * m + q) * m + slot, row, mask=in_row)
    # inactive samples report zero norms (their residual is not used)
    gg = tl.sum(tl.where(q == slot, total, 0.0), axis=0)
    ff = tl.sum(tl.where(q == m, total, 0.0), axis=0)
    fe = tl.sum(tl.where(q == m + 1, total, 0.0), axis=0)
    tl.store(norms_ptr + b64 * 3, gg.to(norms_ptr.dtype.element_ty))
    tl.store(norms_ptr + b64 * 3 + 1, ff.to(norms_ptr.dtype.element_ty))
    tl.store(norms_ptr + b64 * 3 + 2, fe.to(norms_ptr.dtype.element_ty))


def anderson_update(fx: torch.Tensor, x: torch.Tensor, F: torch.Tensor, G: torch.Tensor,
                    gram: torch.Tensor, active: torch.Tensor, slot: int, n: int,
                    block: int | None = None) -> torch.Tensor:
    """Launch the update; arguments are validated by the caller (ldeq_fast.ops.anderson)."""
    B, D = x.shape
    m = F.shape[1]
    if m * D >= 2**31:
        raise ValueError(f"anderson_update (triton): m * D = {m * D} overflows the kernel's 32-bit in-sample offsets")
    BLOCK = block or pick_block(D)
    nblk = triton.cdiv(D, BLOCK)
    part = torch.empty(B, nblk, m + 2, dtype=torch.float64, device=x.device)
    norms = torch.empty(B, 3, dtype=gram.dtype, device=x.device)
    _update_blocks_kernel[(B, nblk)](fx, x, F, G, active, part, D, m, slot, n, nblk, BLOCK=BLOCK,
                                     num_warps=4 if BLOCK <= 2048 else 8)
    QP = triton.next_power_of_2(m + 2)
    _update_reduce_kernel[(B,)](part, active, gram, norms, m, slot, n, nblk, QP=QP, RB=64, num_warps=1)
    return norms
