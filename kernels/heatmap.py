"""Triton kernels of the heatmap head (ldeq_fast.ops.heatmap): softargmax normalisation and the
expected-coordinate read-out, forward and backward.  One program per (batch, keypoint) heatmap.

Forward per heatmap: the max; hm = exp(beta * (h - max)) with its mass and first moments; the central
second moments about the means (hm recomputed, not re-read, so no pass depends on another's stores).
Backward: dL/dhm = c0 + fy(row) + fx(col) (quadratics about the means, see csrc/cpu/heatmap.cpp), then
dh = beta * (gt * hm - [h == max] * sum(gt * hm) / ties) with gt the total gradient of hm; a pre-pass
gets the sums and the tie count, so the writing pass needs nothing it wrote itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MASS_EPS = 1e-4
_MAX_BLOCK = 4096


@triton.jit
def _acc(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _head_fwd_kernel(src_ptr, beta_ptr, hm_ptr, hmax_ptr, kp_ptr, spread_ptr, pub_ptr, mass_ptr, K, H, W, mass_eps,
                     EXP: tl.constexpr, KEYPOINTS: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    HW = H * W
    base = i.to(tl.int64) * HW
    lanes = tl.arange(0, BLOCK)
    zero = _acc(tl.zeros([BLOCK], dtype=tl.float32), FP64)
    beta = tl.sum(zero, axis=0)
    hmax = beta
    if EXP:
        beta = _acc(tl.load(beta_ptr + i % K), FP64)
        mv = zero - float("inf")
        for s in range(0, HW, BLOCK):
            offs = s + lanes
            x = _acc(tl.load(src_ptr + base + offs, mask=offs < HW, other=-float("inf")), FP64)
            mv = tl.maximum(mv, x, propagate_nan=tl.PropagateNan.ALL)
        hmax = tl.max(mv, axis=0)
        tl.store(hmax_ptr + i, hmax)
    if KEYPOINTS:
        s0 = zero
        sx = zero
        sy = zero
        for s in range(0, HW, BLOCK):
            offs = s + lanes
            m = offs < HW
            v = _acc(tl.load(src_ptr + base + offs, mask=m, other=0.0), FP64)
            if EXP:
                v = tl.exp(beta * (v - hmax))
                tl.store(hm_ptr + base + offs, v, mask=m)
                v = tl.where(m, v, 0.0)
            s0 += v
            sx += v * (offs % W)
            sy += v * (offs // W)
        S0 = tl.sum(s0, axis=0)
        d = mass_eps + S0
        mx = tl.sum(sx, axis=0) / d
        my = tl.sum(sy, axis=0) / d
        P = S0 / d
        qx = zero
        qy = zero
        for s in range(0, HW, BLOCK):
            offs = s + lanes
            m = offs < HW
            v = _acc(tl.load(src_ptr + base + offs, mask=m, other=0.0), FP64)
            if EXP:
                v = tl.where(m, tl.exp(beta * (v - hmax)), 0.0)
            u = (offs % W) - mx
            w = (offs // W) - my
            qx += v * u * u
            qy += v * w * w
        Hf = H * 1.0
        vx = tl.sum(qx, axis=0) / d
        vy = tl.sum(qy, axis=0) / d
        ex = mx - mx / Hf
        ey = my - my / Hf
        pvx = vx + 2.0 * ex * mx * (1.0 - P) + ex * ex * P
        pvy = vy + 2.0 * ey * my * (1.0 - P) + ey * ey * P
        tl.store(kp_ptr + 2 * i, mx / Hf)
        tl.store(kp_ptr + 2 * i + 1, my / Hf)
        tl.store(spread_ptr + i, tl.sqrt(0.5 * vx + 0.5 * vy) / Hf)
        tl.store(pub_ptr + i, tl.sqrt(tl.maximum(0.5 * pvx + 0.5 * pvy, 0.0)) / Hf)
        tl.store(mass_ptr + i, S0)
    elif EXP:
        for s in range(0, HW, BLOCK):
            offs = s + lanes
            m = offs < HW
            v = _acc(tl.load(src_ptr + base + offs, mask=m, other=0.0), FP64)
            tl.store(hm_ptr + base + offs, tl.exp(beta * (v - hmax)), mask=m)


@triton.jit
def _head_bwd_kernel(g_ptr, h_ptr, beta_ptr, hm_ptr, hmax_ptr, gk_ptr, gs_ptr, gp_ptr, kp_ptr, spread_ptr, pub_ptr,
                     mass_ptr, out_ptr, dbeta_ptr, K, H, W, mass_eps, EXP: tl.constexpr, KEYPOINTS: tl.constexpr,
                     FP64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    HW = H * W
    base = i.to(tl.int64) * HW
    lanes = tl.arange(0, BLOCK)
    zero = _acc(tl.zeros([BLOCK], dtype=tl.float32), FP64)
    szero = tl.sum(zero, axis=0)
    # keypoint-output gradient: dL/dhm = c0 + (ay v + quad v^2) / d + (ax u + quad u^2) / d
    c0 = szero
    cx = szero
    cy = szero
    quad = szero
    mx = szero
    my = szero
    d = szero + 1.0
    if KEYPOINTS:
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
    if EXP:
        beta = _acc(tl.load(beta_ptr + i % K), FP64)
        hmax = _acc(tl.load(hmax_ptr + i), FP64)
        st = zero
        sb = zero
        ties = zero
        for s in range(0, HW, BLOCK):
            offs = s + lanes
            m = offs < HW
            gt = _acc(tl.load(g_ptr + base + offs, mask=m, other=0.0), FP64)
            if KEYPOINTS:
                u = (offs % W) - mx
                v = (offs // W) - my
                gt += c0 + (cx * u + quad * u * u) / d + (cy * v + quad * v * v) / d
            x = _acc(tl.load(h_ptr + base + offs, mask=m, other=0.0), FP64)
            hm = _acc(tl.load(hm_ptr + base + offs, mask=m, other=0.0), FP64)
            t = tl.where(m, gt * hm, 0.0)
            st += t
            sb += t * (x - hmax)
            ties += tl.where(m & (x == hmax), 1.0, 0.0)
        share = tl.sum(st, axis=0) / tl.maximum(tl.sum(ties, axis=0), 1.0)
        for s in range(0, HW, BLOCK):
            offs = s + lanes
            m = offs < HW
            gt = _acc(tl.load(g_ptr + base + offs, mask=m, other=0.0), FP64)
            if KEYPOINTS:
                u = (offs % W) - mx
                v = (offs // W) - my
                gt += c0 + (cx * u + quad * u * u) / d + (cy * v + quad * v * v) / d
            x = _acc(tl.load(h_ptr + base + offs, mask=m, other=0.0), FP64)
            hm = _acc(tl.load(hm_ptr + base + offs, mask=m, other=0.0), FP64)
            dh = beta * (gt * hm - tl.where(x == hmax, share, 0.0))
            tl.store(out_ptr + base + offs, dh, mask=m)
        tl.store(dbeta_ptr + i, tl.sum(sb, axis=0))
    else:
        for s in range(0, HW, BLOCK):
            offs = s + lanes
            u = (offs % W) - mx
            v = (offs // W) - my
            dhm = c0 + (cx * u + quad * u * u) / d + (cy * v + quad * v * v) / d
            tl.store(out_ptr + base + offs, dhm, mask=offs < HW)


def _block(HW: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(HW))


def _launch_forward(h: torch.Tensor, beta: torch.Tensor | None, with_exp: bool, with_keypoints: bool):
    B, K, H, W = h.shape
    hm = torch.empty_like(h) if with_exp else None
    hmax = h.new_empty(B, K) if with_exp else None
    kpts = h.new_empty(B, K, 2) if with_keypoints else None
    spread, published, mass = ((h.new_empty(B, K) for _ in range(3)) if with_keypoints else (None,) * 3)
    if h.numel() > 0:
        dummy = h.new_empty(1)
        _head_fwd_kernel[(B * K,)](
            h, beta if with_exp else dummy, hm if with_exp else dummy, hmax if with_exp else dummy,
            kpts if with_keypoints else dummy, spread if with_keypoints else dummy,
            published if with_keypoints else dummy, mass if with_keypoints else dummy, K, H, W, MASS_EPS,
            EXP=with_exp, KEYPOINTS=with_keypoints, FP64=h.dtype == torch.float64, BLOCK=_block(H * W))
    return hm, hmax, kpts, spread, published, mass


def softargmax_heatmaps(h: torch.Tensor, beta: torch.Tensor):
    """(hm, hmax): hm = exp(beta * (h - max h)) per map.  h: contiguous (B, K, H, W) float32/float64;
    beta: (K,) of h's dtype."""
    hm, hmax, *_ = _launch_forward(h, beta, True, False)
    return hm, hmax


def softargmax_heatmaps_backward(g_hm, h, beta, hm, hmax):
    """(dh, dbeta) of hm = exp(beta * (h - max h))."""
    B, K, H, W = h.shape
    dh = torch.empty_like(h)
    dbeta_part = h.new_empty(B, K)
    if h.numel() > 0:
        dummy = h.new_empty(1)
        _head_bwd_kernel[(B * K,)](g_hm.contiguous(), h, beta, hm, hmax, *(dummy,) * 7, dh, dbeta_part, K, H, W,
                                   MASS_EPS, EXP=True, KEYPOINTS=False, FP64=h.dtype == torch.float64,
                                   BLOCK=_block(H * W))
    else:
        dbeta_part.zero_()
    return dh, dbeta_part.sum(0).to(beta.dtype)


def heatmap_keypoints(hm: torch.Tensor):
    """(kpts, spread, published, mass) of contiguous (B, K, H, W) float32/float64 heatmaps."""
    return _launch_forward(hm, None, False, True)[2:]


def heatmap_keypoints_backward(g_kpts, g_spread, g_published, hm, kpts, spread, published, mass):
    """dhm of (keypoints, spread, published) = heatmap_keypoints(hm)."""
    B, K, H, W = hm.shape
    dhm = torch.empty_like(hm)
    if hm.numel() > 0:
        dummy = hm.new_empty(1)
        _head_bwd_kernel[(B * K,)](dummy, dummy, dummy, dummy, dummy, g_kpts, g_spread, g_published, kpts, spread,
                                   published, mass, dhm, dummy, K, H, W, MASS_EPS, EXP=False, KEYPOINTS=True,
                                   FP64=hm.dtype == torch.float64, BLOCK=_block(H * W))
    return dhm
