"""Triton kernels of the fused LeakyReLU -> GroupNorm (ldeq_fast.ops.leaky_relu_group_norm).

Both NCHW-contiguous and channels_last tensors are addressed through (n, spatial, channel) strides, so one
set of kernels serves both layouts.  Every kernel works on (spatial block, channel block) tiles of one
image: an element's channel is its tile column, so no pass divides a flat index per element (a 64-bit
divide/remainder costs tens of instructions, more than the element's bandwidth on a GPU).  Offsets inside
an image are 32-bit (the launchers check C * H * W < 2**31); the image offset is 64-bit.  Statistics are
fp32 (fp64 for float64 inputs):

forward   1. per (image, group, spatial chunk, channel block) tile program: the tile's mean and sum of
             squared deviations, merged over the chunk's blocks with Chan's formula;
          2. per (image, group): the partials merged -- mean of the partial means, then the sum of squared
             deviations (two passes over a small buffer, no cancellation).  The chunking splits each
             image's reduction over ~1024 programs in stage 1, so stage 2 reads a few hundred partials at
             batch 1 (one loop trip per pass) instead of a partial per channel;
          3. out = (lrelu(x) - mean) * a + bias [+ residual], a = rstd * weight per channel.
backward  1. per (image, spatial chunk, channel block): sums of g * (lrelu(x) - mean) and of g per channel;
          2. small per-(image, channel) coefficient math in PyTorch;
          3. dx = (k1 * g + k2 * (lrelu(x) - mean) + k3) * lrelu'(x).
The activation is recomputed from x, never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TARGET_PROGRAMS = 1024  # the statistics' chunking aims at about this many tile programs


@triton.jit
def _lrelu(x, slope):
    return tl.where(x > 0, x, x * slope)


@triton.jit
def _acc(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _tile_offsets(sb, cb, HW, C, stride_c, stride_s, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(32-bit in-image offsets, mask, channels) of spatial block sb x channel block cb."""
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (ss < HW)[:, None] & (cs < C)[None, :]
    return ss[:, None] * stride_s + cs[None, :] * stride_c, mask, cs


@triton.jit(do_not_specialize=["Cg", "G", "n_chunks", "chunk", "n_cbg"])
def _partial_moments_kernel(x_ptr, pmean_ptr, pm2_ptr, HW, Cg, G, n_chunks, chunk, n_cbg, stride_n, stride_c,
                            stride_s, slope, FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    ng = tl.program_id(0)
    sc = tl.program_id(1)
    cb = tl.program_id(2)
    n = ng // G
    c0 = (ng % G) * Cg + cb * BLOCK_C                # first channel of this tile (inside group ng % G)
    nc = tl.minimum(BLOCK_C, Cg - cb * BLOCK_C)       # its channels
    base = x_ptr + n.to(tl.int64) * stride_n + c0 * stride_c
    s_end = tl.minimum(HW, sc * chunk + chunk)
    mean = _acc(tl.sum(tl.zeros([2], dtype=tl.float32), axis=0), FP64)  # a scalar 0 of the statistics' dtype
    m2 = mean
    seen = mean
    for s0 in range(sc * chunk, s_end, BLOCK_S):
        offs, mask, _ = _tile_offsets(0, 0, s_end - s0, nc, stride_c, stride_s, BLOCK_S, BLOCK_C)
        y = _lrelu(_acc(tl.load(base + s0 * stride_s + offs, mask=mask, other=0.0), FP64), slope)
        nb = (tl.minimum(BLOCK_S, s_end - s0) * nc).to(mean.dtype)
        bmean = tl.sum(tl.sum(y, axis=1), axis=0) / nb
        d = tl.where(mask, y - bmean, 0.0)
        bm2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        total = seen + nb
        delta = bmean - mean
        mean += delta * (nb / total)
        m2 += bm2 + delta * delta * (seen * nb / total)
        seen = total
    out = (ng.to(tl.int64) * n_chunks + sc) * n_cbg + cb
    tl.store(pmean_ptr + out, mean)
    tl.store(pm2_ptr + out, m2)


@triton.jit
def _partial_count(j, n_cbg, chunk, HW, Cg, BLOCK_C: tl.constexpr):
    """Elements behind partial j = (spatial chunk, channel block) of a group."""
    sc = j // n_cbg
    return tl.minimum(chunk, HW - sc * chunk) * tl.minimum(BLOCK_C, Cg - (j - sc * n_cbg) * BLOCK_C)


@triton.jit(do_not_specialize=["HW", "Cg", "n_chunks", "chunk", "n_cbg"])
def _group_stats_kernel(pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, HW, Cg, n_chunks, chunk, n_cbg, group_size, eps,
                        FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr):
    ng = tl.program_id(0)
    items = n_chunks * n_cbg
    first = pmean_ptr + ng.to(tl.int64) * items
    acc = _acc(tl.zeros([BLOCK], dtype=tl.float32), FP64)
    for j0 in range(0, items, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jm = j < items
        cnt = _partial_count(j, n_cbg, chunk, HW, Cg, BLOCK_C).to(acc.dtype)
        acc += tl.where(jm, cnt * tl.load(first + j, mask=jm, other=0.0), 0.0)
    mean = tl.sum(acc, axis=0) / group_size
    acc = acc * 0.0
    for j0 in range(0, items, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jm = j < items
        cnt = _partial_count(j, n_cbg, chunk, HW, Cg, BLOCK_C).to(acc.dtype)
        d = tl.load(first + j, mask=jm, other=0.0) - mean
        p2 = tl.load(pm2_ptr + ng.to(tl.int64) * items + j, mask=jm, other=0.0)
        acc += tl.where(jm, p2 + cnt * d * d, 0.0)
    var = tl.sum(acc, axis=0) / group_size
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + eps))


@triton.jit(do_not_specialize=["G", "Cg"])
def _apply_kernel(x_ptr, res_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, HW, G, Cg, stride_n, stride_c,
                  stride_s, slope, HAS_RES: tl.constexpr, FP64: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    offs, mask, cs = _tile_offsets(tl.program_id(1), tl.program_id(2), HW, C, stride_c, stride_s, BLOCK_S, BLOCK_C)
    cm = cs < C
    ng = n * G + cs // Cg                            # BLOCK_C divisions per tile, not one per element
    mu = tl.load(mean_ptr + ng, mask=cm, other=0.0)[None, :]
    a = (tl.load(rstd_ptr + ng, mask=cm, other=0.0) * tl.load(w_ptr + cs, mask=cm, other=0.0))[None, :]
    b = tl.load(b_ptr + cs, mask=cm, other=0.0)[None, :]
    img = n.to(tl.int64) * stride_n
    # (y - mean) * a + b, not y * a + (b - mean * a): that would cancel where rstd is large (a tiny variance)
    y = (_lrelu(_acc(tl.load(x_ptr + img + offs, mask=mask, other=0.0), FP64), slope) - mu) * a + b
    if HAS_RES:
        y += tl.load(res_ptr + img + offs, mask=mask, other=0.0).to(y.dtype)
    tl.store(out_ptr + img + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["G", "Cg", "n_chunks", "chunk"])
def _grad_sums_kernel(x_ptr, g_ptr, mean_ptr, psdy_ptr, psg_ptr, C, HW, G, Cg, n_chunks, chunk, stride_n, stride_c,
                      stride_s, slope, FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    sc = tl.program_id(1)
    cb = tl.program_id(2)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    s_end = tl.minimum(HW, sc * chunk + chunk)
    mu = tl.load(mean_ptr + n * G + cs // Cg, mask=cmask, other=0.0)
    sdy = _acc(tl.zeros([BLOCK_C], dtype=tl.float32), FP64)
    sg = sdy
    img = n.to(tl.int64) * stride_n
    for s0 in range(sc * chunk, s_end, BLOCK_S):
        offs, mask, _ = _tile_offsets(0, cb, s_end - s0, C, stride_c, stride_s, BLOCK_S, BLOCK_C)
        offs += s0 * stride_s
        x = _acc(tl.load(x_ptr + img + offs, mask=mask, other=0.0), FP64)
        g = _acc(tl.load(g_ptr + img + offs, mask=mask, other=0.0), FP64)
        sdy += tl.sum(g * (_lrelu(x, slope) - mu[None, :]), axis=0)
        sg += tl.sum(g, axis=0)
    out = (n * n_chunks + sc) * C + cs
    tl.store(psdy_ptr + out, sdy, mask=cmask)
    tl.store(psg_ptr + out, sg, mask=cmask)


@triton.jit
def _grad_apply_kernel(x_ptr, g_ptr, dx_ptr, mu_ptr, k1_ptr, k2_ptr, k3_ptr, C, HW, stride_n, stride_c, stride_s,
                       slope, FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    offs, mask, cs = _tile_offsets(tl.program_id(1), tl.program_id(2), HW, C, stride_c, stride_s, BLOCK_S, BLOCK_C)
    cm = cs < C
    nc = n * C + cs
    mu = tl.load(mu_ptr + nc, mask=cm, other=0.0)[None, :]
    k1 = tl.load(k1_ptr + nc, mask=cm, other=0.0)[None, :]
    k2 = tl.load(k2_ptr + nc, mask=cm, other=0.0)[None, :]
    k3 = tl.load(k3_ptr + nc, mask=cm, other=0.0)[None, :]
    img = n.to(tl.int64) * stride_n
    x = _acc(tl.load(x_ptr + img + offs, mask=mask, other=0.0), FP64)
    g = _acc(tl.load(g_ptr + img + offs, mask=mask, other=0.0), FP64)
    dy = k1 * g + k2 * (_lrelu(x, slope) - mu) + k3
    tl.store(dx_ptr + img + offs, tl.where(x > 0, dy, dy * slope).to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor) -> bool:
    """True for channels_last, False for NCHW-contiguous; anything else is refused."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError("leaky_relu_group_norm (triton): x must be contiguous or channels_last")


def _tile(C: int, HW: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of a tile: up to 32 channels x 2048 elements."""
    block_c = min(32, triton.next_power_of_2(C))
    return max(16, min(128, 2048 // block_c, triton.next_power_of_2(HW))), block_c


def _warps(block_s: int, block_c: int) -> int:
    """8 warps for a full tile (8 elements per thread): at 4 warps triton 3.6 gives the backward's sums pass
    ~168 registers on sm_90 (fp16 channels_last spills), at 8 warps <= 80."""
    return 8 if block_s * block_c >= 2048 else 4


def _strides(x: torch.Tensor):
    N, C, H, W = x.shape
    if C * H * W >= 2**31:
        raise ValueError(f"leaky_relu_group_norm (triton): C * H * W = {C * H * W} overflows the kernels' "
                         "32-bit in-image offsets")
    if H * W > 16 * 65535:
        raise ValueError(f"leaky_relu_group_norm (triton): H * W = {H * W} exceeds the launch grid's spatial axis")
    sn, sc, _, sw = x.stride()  # the spatial index runs over h * W + w for both layouts
    return sn, sc, sw


def _chunking(programs: int, HW: int, block_s: int) -> tuple[int, int]:
    """(chunk, n_chunks): spatial chunks of whole blocks, about _TARGET_PROGRAMS programs in all."""
    want = max(1, triton.cdiv(_TARGET_PROGRAMS, max(1, programs)))
    chunk = max(block_s, triton.cdiv(triton.cdiv(HW, want), block_s) * block_s)
    return chunk, triton.cdiv(HW, chunk)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def leaky_relu_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                          eps: float, slope: float, residual: torch.Tensor | None = None,
                          out: torch.Tensor | None = None):
    """(out, mean, rstd) of group_norm(leaky_relu(x)) [+ residual]; mean/rstd are (N, num_groups) statistics."""
    _layout(x)
    if residual is not None and (residual.shape != x.shape or residual.stride() != x.stride()
                                 or residual.dtype != x.dtype):
        raise ValueError("leaky_relu_group_norm (triton): residual must match x in shape, strides and dtype")
    N, C, H, W = x.shape
    HW, G = H * W, num_groups
    Cg = C // G
    acc = stats_dtype(x.dtype)
    fp64 = acc == torch.float64
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.stride() != x.stride() or out.dtype != x.dtype:
        raise ValueError("leaky_relu_group_norm (triton): out must match x in shape, strides and dtype")
    mean = torch.empty(N, G, device=x.device, dtype=acc)
    rstd = torch.empty(N, G, device=x.device, dtype=acc)
    if x.numel() == 0:
        return out, mean.zero_(), rstd.fill_(1.0 / eps ** 0.5 if eps > 0 else float("inf"))
    sn, sc, ss = _strides(x)
    # statistics: tiles inside one group
    block_s, block_cg = _tile(Cg, HW)
    n_cbg = triton.cdiv(Cg, block_cg)
    chunk, n_chunks = _chunking(N * G * n_cbg, HW, block_s)
    pmean = torch.empty(N * G, n_chunks, n_cbg, device=x.device, dtype=acc)
    pm2 = torch.empty_like(pmean)
    _partial_moments_kernel[(N * G, n_chunks, n_cbg)](x, pmean, pm2, HW, Cg, G, n_chunks, chunk, n_cbg, sn, sc, ss,
                                                      slope, FP64=fp64, BLOCK_S=block_s, BLOCK_C=block_cg,
                                                      num_warps=_warps(block_s, block_cg))
    _group_stats_kernel[(N * G,)](pmean, pm2, mean, rstd, HW, Cg, n_chunks, chunk, n_cbg, float(Cg * HW), eps,
                                  FP64=fp64, BLOCK_C=block_cg,
                                  BLOCK=min(1024, triton.next_power_of_2(n_chunks * n_cbg)))
    # output pass: tiles over all channels
    block_s, block_c = _tile(C, HW)
    _apply_kernel[(N, triton.cdiv(HW, block_s), triton.cdiv(C, block_c))](
        x, x if residual is None else residual, out, mean, rstd, weight.to(acc).contiguous(),
        bias.to(acc).contiguous(), C, HW, G, Cg, sn, sc, ss, slope, HAS_RES=residual is not None, FP64=fp64,
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=_warps(block_s, block_c))
    return out, mean, rstd


def leaky_relu_group_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                   rstd: torch.Tensor, num_groups: int, slope: float,
                                   dx: torch.Tensor | None = None):
    """(dx, dweight, dbias) of group_norm(leaky_relu(x)) given the forward's mean/rstd."""
    channels_last = _layout(x)
    g = grad_out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    N, C, H, W = x.shape
    HW, G = H * W, num_groups
    Cg = C // G
    acc = stats_dtype(x.dtype)
    fp64 = acc == torch.float64
    if dx is None:
        dx = torch.empty_like(x)
    elif dx.shape != x.shape or dx.stride() != x.stride() or dx.dtype != x.dtype:
        raise ValueError("leaky_relu_group_norm (triton): dx must match x in shape, strides and dtype")
    mean = mean.to(acc).contiguous()
    rstd = rstd.to(acc).contiguous()
    w = weight.to(acc)
    if x.numel() == 0:
        z = torch.zeros(C, device=x.device, dtype=weight.dtype)
        return dx, z, z.clone()
    sn, sc, ss = _strides(x)
    block_s, block_c = _tile(C, HW)
    n_cb = triton.cdiv(C, block_c)
    chunk, n_chunks = _chunking(N * n_cb, HW, block_s)
    psdy = torch.empty(N, n_chunks, C, device=x.device, dtype=acc)
    psg = torch.empty_like(psdy)
    _grad_sums_kernel[(N, n_chunks, n_cb)](x, g, mean, psdy, psg, C, HW, G, Cg, n_chunks, chunk, sn, sc, ss, slope,
                                           FP64=fp64, BLOCK_S=block_s, BLOCK_C=block_c,
                                           num_warps=_warps(block_s, block_c))
    sdy, sg = psdy.sum(1), psg.sum(1)  # (N, C)
    # dy = rstd * (g*w - mean(g*w) - yhat * mean(g*w*yhat)) over the M elements of a group
    M = Cg * HW
    r = rstd.repeat_interleave(Cg, dim=1)
    A = (w * sdy).view(N, G, Cg).sum(-1)
    B = (w * sg).view(N, G, Cg).sum(-1)
    k1 = (r * w).contiguous()
    k2 = (-(rstd ** 3) * A / M).repeat_interleave(Cg, dim=1).contiguous()
    k3 = (-rstd * B / M).repeat_interleave(Cg, dim=1).contiguous()
    mu = mean.repeat_interleave(Cg, dim=1).contiguous()
    _grad_apply_kernel[(N, triton.cdiv(HW, block_s), n_cb)](x, g, dx, mu, k1, k2, k3, C, HW, sn, sc, ss, slope,
                                                            FP64=fp64, BLOCK_S=block_s, BLOCK_C=block_c,
                                           num_warps=_warps(block_s, block_c))
    dw = (r * sdy).sum(0).to(weight.dtype)
    db = sg.sum(0).to(weight.dtype)
    return dx, dw, db
