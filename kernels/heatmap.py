"""Triton kernels of the heatmap head (ldeq_fast.ops.heatmap): softargmax normalisation and the
expected-coordinate read-out, forward and backward.  One program per (batch, keypoint) heatmap, one kernel
per op (the launchers' names are the ops').

softargmax   forward: the max, then hm = exp(beta * (h - max)).  Backward: dh = beta * (g * hm - [h == max] *
             sum(g * hm) / ties); a pre-pass gets the sums and the tie count, so the writing pass needs
             nothing it wrote itself.
keypoints    forward: mass and first moments, then the central second moments about the means (two reads,
             no pass depends on another's stores).  Backward: dL/dhm = c0 + fy(row) + fx(col), quadratics
             about the means (see csrc/cpu/heatmap.cpp).
The read-out kernels walk each map as (rows, columns) tiles, so an element's row and column come from the
tile's aranges, not from a per-element division by W.  Tiles of 1024 elements at 4 warps keep every
accumulator at 8 registers per thread: a 4096-element block made ~190-255 registers and spilled (sm_90).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MASS_EPS = 1e-4
_BLOCK = 1024  # elements per tile (4 warps: 8 per thread)


@triton.jit
def _acc(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit(do_not_specialize=["K"])
def _softargmax_fwd_kernel(h_ptr, beta_ptr, hm_ptr, hmax_ptr, K, HW, FP64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    base = i.to(tl.int64) * HW
    lanes = tl.arange(0, BLOCK)
    beta = _acc(tl.load(beta_ptr + i % K), FP64)
    mv = _acc(tl.full([BLOCK], float("-inf"), tl.float32), FP64)
    for s in range(0, HW, BLOCK):
        offs = s + lanes
        x = _acc(tl.load(h_ptr + base + offs, mask=offs < HW, other=-float("inf")), FP64)
        mv = tl.maximum(mv, x, propagate_nan=tl.PropagateNan.ALL)
    hmax = tl.max(mv, axis=0)
    tl.store(hmax_ptr + i, hmax)
    for s in range(0, HW, BLOCK):
        offs = s + lanes
        m = offs < HW
        x = _acc(tl.load(h_ptr + base + offs, mask=m, other=0.0), FP64)
        tl.store(hm_ptr + base + offs, tl.exp(beta * (x - hmax)), mask=m)


@triton.jit(do_not_specialize=["K"])
def _softargmax_bwd_kernel(g_ptr, h_ptr, beta_ptr, hm_ptr, hmax_ptr, dh_ptr, dbeta_ptr, K, HW,
                           FP64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    base = i.to(tl.int64) * HW
    lanes = tl.arange(0, BLOCK)
    beta = _acc(tl.load(beta_ptr + i % K), FP64)
    hmax = _acc(tl.load(hmax_ptr + i), FP64)
    zero = _acc(tl.zeros([BLOCK], dtype=tl.float32), FP64)
    st = zero
    sb = zero
    ties = zero
    for s in range(0, HW, BLOCK):
        offs = s + lanes
        m = offs < HW
        g = _acc(tl.load(g_ptr + base + offs, mask=m, other=0.0), FP64)
        x = _acc(tl.load(h_ptr + base + offs, mask=m, other=0.0), FP64)
        hm = _acc(tl.load(hm_ptr + base + offs, mask=m, other=0.0), FP64)
        t = tl.where(m, g * hm, 0.0)
        st += t
        sb += t * (x - hmax)
        ties += tl.where(m & (x == hmax), 1.0, 0.0)
    share = tl.sum(st, axis=0) / tl.maximum(tl.sum(ties, axis=0), 1.0)
    for s in range(0, HW, BLOCK):
        offs = s + lanes
        m = offs < HW
        g = _acc(tl.load(g_ptr + base + offs, mask=m, other=0.0), FP64)
        x = _acc(tl.load(h_ptr + base + offs, mask=m, other=0.0), FP64)
        hm = _acc(tl.load(hm_ptr + base + offs, mask=m, other=0.0), FP64)
        tl.store(dh_ptr + base + offs, beta * (g * hm - tl.where(x == hmax, share, 0.0)), mask=m)
    tl.store(dbeta_ptr + i, tl.sum(sb, axis=0))


@triton.jit
def _keypoints_fwd_kernel(hm_ptr, kp_ptr, spread_ptr, pub_ptr, mass_ptr, H, W, mass_eps,
                          FP64: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    i = tl.program_id(0)
    base = i.to(tl.int64) * H * W
    rows = tl.arange(0, BH)[:, None]
    cols = tl.arange(0, BW)[None, :]
    zero = _acc(tl.zeros([BH, BW], dtype=tl.float32), FP64)
    s0 = zero
    sx = zero
    sy = zero
    for r0 in range(0, H, BH):
        for c0 in range(0, W, BW):
            r, c = r0 + rows, c0 + cols
            v = _acc(tl.load(hm_ptr + base + r * W + c, mask=(r < H) & (c < W), other=0.0), FP64)
            s0 += v
            sx += v * c
            sy += v * r
    S0 = tl.sum(tl.sum(s0, axis=1), axis=0)
    d = mass_eps + S0
    mx = tl.sum(tl.sum(sx, axis=1), axis=0) / d
    my = tl.sum(tl.sum(sy, axis=1), axis=0) / d
    P = S0 / d
    qx = zero
    qy = zero
    for r0 in range(0, H, BH):
        for c0 in range(0, W, BW):
            r, c = r0 + rows, c0 + cols
            v = _acc(tl.load(hm_ptr + base + r * W + c, mask=(r < H) & (c < W), other=0.0), FP64)
            u = c - mx
            w = r - my
            qx += v * u * u
            qy += v * w * w
    Hf = H * 1.0
    vx = tl.sum(tl.sum(qx, axis=1), axis=0) / d
    vy = tl.sum(tl.sum(qy, axis=1), axis=0) / d
    ex = mx - mx / Hf
    ey = my - my / Hf
    pvx = vx + 2.0 * ex * mx * (1.0 - P) + ex * ex * P
    pvy = vy + 2.0 * ey * my * (1.0 - P) + ey * ey * P
    tl.store(kp_ptr + 2 * i, mx / Hf)
    tl.store(kp_ptr + 2 * i + 1, my / Hf)
    tl.store(spread_ptr + i, tl.sqrt(0.5 * vx + 0.5 * vy) / Hf)
    tl.store(pub_ptr + i, tl.sqrt(tl.maximum(0.5 * pvx + 0.5 * pvy, 0.0)) / Hf)
    tl.store(mass_ptr + i, S0)


@triton.jit
def _keypoints_bwd_kernel(gk_ptr, gs_ptr, gp_ptr, kp_ptr, spread_ptr, pub_ptr, mass_ptr, dhm_ptr, H, W, mass_eps,
                          FP64: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    i = tl.program_id(0)
    base = i.to(tl.int64) * H * W
    Hf = H * 1.0
    gkx = _acc(tl.load(gk_ptr + 2 * i), FP64)
    gky = _acc(tl.load(gk_ptr + 2 * i + 1), FP64)
    gs = _acc(tl.load(gs_ptr + i), FP64)
    gp = _acc(tl.load(gp_ptr + i), FP64)
    sp = _acc(tl.load(spread_ptr + i), FP64)
    pub = _acc(tl.load(pub_ptr + i), FP64)
    mass = _acc(tl.load(mass_ptr + i), FP64)
    mx = _acc(tl.load(kp_ptr + 2 * i), FP64) * Hf
    my = _acc(tl.load(kp_ptr + 2 * i + 1), FP64) * Hf
    d = mass_eps + mass
    P = mass / d
    ex = mx - mx / Hf
    ey = my - my / Hf
    # a zero incoming gradient contributes nothing, even where spread is 0
    Gs = tl.where(gs == 0.0, 0.0, gs / (4.0 * Hf * Hf * tl.where(gs == 0.0, 1.0, sp)))
    Gp = tl.where(gp == 0.0, 0.0, gp / (4.0 * Hf * Hf * tl.where(gp == 0.0, 1.0, pub)))
    cx = gkx / Hf - 2.0 * Gs * mx * (1.0 - P) + Gp * (2.0 * ex - 2.0 * (mx - P * mx / Hf) / Hf)
    cy = gky / Hf - 2.0 * Gs * my * (1.0 - P) + Gp * (2.0 * ey - 2.0 * (my - P * my / Hf) / Hf)
    quad = Gs + Gp
    cs = tl.where(gs == 0.0, 0.0, -0.5 * gs * sp)
    cp = tl.where(gp == 0.0, 0.0, -0.5 * gp * pub + Gp * (ex * ex + ey * ey))
    c0 = (cs + cp) / d
    rows = tl.arange(0, BH)[:, None]
    cols = tl.arange(0, BW)[None, :]
    for r0 in range(0, H, BH):
        for c0_ in range(0, W, BW):
            r, c = r0 + rows, c0_ + cols
            u = c - mx
            v = r - my
            dhm = c0 + (cx * u + quad * u * u) / d + (cy * v + quad * v * v) / d
            tl.store(dhm_ptr + base + r * W + c, dhm, mask=(r < H) & (c < W))


def _block(HW: int) -> int:
    return min(_BLOCK, triton.next_power_of_2(HW))


def _tile(H: int, W: int) -> tuple[int, int]:
    """(rows, columns) of a read-out tile: whole rows of up to _BLOCK elements."""
    BW = min(_BLOCK, triton.next_power_of_2(W))
    return min(triton.next_power_of_2(H), max(1, _BLOCK // BW)), BW


def softargmax_heatmaps(h: torch.Tensor, beta: torch.Tensor):
    """(hm, hmax): hm = exp(beta * (h - max h)) per map.  h: contiguous (B, K, H, W) float32/float64;
    beta: (K,) of h's dtype."""
    B, K, H, W = h.shape
    hm = torch.empty_like(h)
    hmax = h.new_empty(B, K)
    if h.numel() > 0:
        _softargmax_fwd_kernel[(B * K,)](h, beta, hm, hmax, K, H * W, FP64=h.dtype == torch.float64,
                                         BLOCK=_block(H * W), num_warps=4)
    return hm, hmax


def softargmax_heatmaps_backward(g_hm, h, beta, hm, hmax):
    """(dh, dbeta) of hm = exp(beta * (h - max h))."""
    B, K, H, W = h.shape
    dh = torch.empty_like(h)
    dbeta_part = h.new_empty(B, K)
    if h.numel() > 0:
        _softargmax_bwd_kernel[(B * K,)](g_hm.contiguous(), h, beta, hm, hmax, dh, dbeta_part, K, H * W,
                                         FP64=h.dtype == torch.float64, BLOCK=_block(H * W), num_warps=4)
    else:
        dbeta_part.zero_()
    return dh, dbeta_part.sum(0).to(beta.dtype)


def heatmap_keypoints(hm: torch.Tensor):
    """(kpts, spread, published, mass) of contiguous (B, K, H, W) float32/float64 heatmaps."""
    B, K, H, W = hm.shape
    kpts = hm.new_empty(B, K, 2)
    spread, published, mass = (hm.new_empty(B, K) for _ in range(3))
    if hm.numel() > 0:
        BH, BW = _tile(H, W)
        _keypoints_fwd_kernel[(B * K,)](hm, kpts, spread, published, mass, H, W, MASS_EPS,
                                        FP64=hm.dtype == torch.float64, BH=BH, BW=BW, num_warps=4)
    return kpts, spread, published, mass


def heatmap_keypoints_backward(g_kpts, g_spread, g_published, hm, kpts, spread, published, mass):
    """dhm of (keypoints, spread, published) = heatmap_keypoints(hm)."""
    B, K, H, W = hm.shape
    dhm = torch.empty_like(hm)
    if hm.numel() > 0:
        BH, BW = _tile(H, W)
        _keypoints_bwd_kernel[(B * K,)](g_kpts, g_spread, g_published, kpts, spread, published, mass, dhm, H, W,
                                        MASS_EPS, FP64=hm.dtype == torch.float64, BH=BH, BW=BW, num_warps=4)
    return dhm
