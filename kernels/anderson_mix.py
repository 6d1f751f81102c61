"""Triton kernel for ``anderson_mix`` (see ldeq_fast/ops/anderson.py for the op's contract).

One pass over the (B, D) state: best = F[:, s] (or, BEST_X, the iterate x before the mix: the published
Anderson returns iterates) for samples whose residual improved, and, for active
samples, x = sum_{j<n} alpha_j (F_j - (1 - beta) G_j) (G is not read at beta = 1).  Also holds the
block-size and accumulator-dtype helpers shared with the other Anderson kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator type for a state dtype: fp32, or fp64 for fp64 state."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def pick_block(D: int) -> int:
    # 4096 elements per program: enough bytes in flight per SM, and B * D / 4096 programs fill an H100
    return max(16, min(4096, triton.next_power_of_2(D)))


@triton.jit(do_not_specialize=["B", "m", "slot", "n"])
def _mix_kernel(F_ptr, G_ptr, alpha_ptr, flags_ptr, x_ptr, best_ptr, B, D, m, slot, n, one_minus_beta,
                MIX: tl.constexpr, USE_G: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                BEST_X: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    b64 = b.to(tl.int64)
    ring = b64 * m * D
    if tl.load(flags_ptr + 3 * B + b):  # improved: this iteration's image (or iterate) is the new best point
        if BEST_X:  # read before this program overwrites its block of x below
            tl.store(best_ptr + b64 * D + offs, tl.load(x_ptr + b64 * D + offs, mask=mask), mask=mask)
        else:
            tl.store(best_ptr + b64 * D + offs, tl.load(F_ptr + ring + slot * D + offs, mask=mask), mask=mask)
    if MIX:
        if tl.load(flags_ptr + b):  # active
            acc = tl.zeros([BLOCK], dtype=ACC)
            for j in range(0, n):
                a = tl.load(alpha_ptr + b64 * m + j).to(ACC)
                acc += a * tl.load(F_ptr + ring + j * D + offs, mask=mask, other=0.0).to(ACC)
                if USE_G:
                    gj = tl.load(G_ptr + ring + j * D + offs, mask=mask, other=0.0).to(ACC)
                    acc -= (one_minus_beta * a) * gj
            tl.store(x_ptr + b64 * D + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)


def anderson_mix(F: torch.Tensor, G: torch.Tensor, alpha: torch.Tensor, flags: torch.Tensor, x: torch.Tensor,
                 best: torch.Tensor, slot: int, n: int, beta: float, mix: bool, best_from_x: bool = False,
                 block: int | None = None) -> None:
    """Launch the mix; arguments are validated by the caller (ldeq_fast.ops.anderson)."""
    B, D = x.shape
    m = F.shape[1]
    if m * D >= 2**31:
        raise ValueError(f"anderson_mix (triton): m * D = {m * D} overflows the kernel's 32-bit in-sample offsets")
    BLOCK = block or pick_block(D)
    _mix_kernel[(B, triton.cdiv(D, BLOCK))](F, G, alpha, flags, x, best, B, D, m, slot, n, 1.0 - float(beta),
                                            MIX=bool(mix), USE_G=float(beta) != 1.0, BLOCK=BLOCK,
                                            ACC=acc_dtype(x.dtype), BEST_X=bool(best_from_x),
                                            num_warps=4 if BLOCK <= 2048 else 8)
