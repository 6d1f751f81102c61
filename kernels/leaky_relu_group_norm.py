"""Triton kernels of the fused LeakyReLU -> GroupNorm (ldeq_fast.ops.leaky_relu_group_norm).

Both NCHW-contiguous and channels_last tensors are addressed through (n, spatial, channel) strides, so
one set of kernels serves both layouts.  Statistics are fp32 (fp64 for float64 inputs):

forward   1. partial moments per (image, spatial chunk, channel) tile, merged over the chunk with
             Chan's formula;
          2. per (image, group): mean of the partial means, then the sum of squared deviations
             (two passes over the small partial buffer, no cancellation);
          3. elementwise out = (lrelu(x) - mean) * rstd * weight + bias [+ residual].
backward  1. per (image, spatial chunk, channel): sums of g * (lrelu(x) - mean) and of g;
          2. small per-(image, channel) coefficient math in PyTorch;
          3. elementwise dx = (k1 * g + k2 * (lrelu(x) - mean) + k3) * lrelu'(x).
The activation is recomputed from x, never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TARGET_PROGRAMS = 1024  # spatial chunking aims at about this many tile programs
_ELEM_BLOCK = 1024


@triton.jit
def _lrelu(x, slope):
    return tl.where(x > 0, x, x * slope)


@triton.jit
def _partial_moments_kernel(x_ptr, pmean_ptr, pm2_ptr, C, HW, n_chunks, chunk, stride_n, stride_c, stride_s,
                            slope, FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    sc = tl.program_id(1)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    s_begin = sc * chunk
    s_end = tl.minimum(HW, s_begin + chunk)
    if FP64:
        mean = tl.zeros([BLOCK_C], dtype=tl.float64)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    else:
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    base = x_ptr + n.to(tl.int64) * stride_n
    for s0 in range(s_begin, s_end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        smask = ss < s_end
        mask = smask[:, None] & cmask[None, :]
        x = tl.load(base + ss[:, None].to(tl.int64) * stride_s + cs[None, :] * stride_c, mask=mask, other=0.0)
        x = x.to(mean.dtype)
        y = _lrelu(x, slope)
        seen = (s0 - s_begin).to(mean.dtype)
        nb = tl.minimum(BLOCK_S, s_end - s0).to(mean.dtype)
        bmean = tl.sum(y, axis=0) / nb
        d = tl.where(mask, y - bmean[None, :], 0.0)
        bm2 = tl.sum(d * d, axis=0)
        total = seen + nb
        delta = bmean - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + bm2 + delta * delta * (seen * nb / total)
    out = (n * n_chunks + sc) * C + cs
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _group_stats_kernel(pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, C, HW, G, Cg, n_chunks, chunk, group_size, eps,
                        FP64: tl.constexpr, BLOCK: tl.constexpr):
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    items = n_chunks * Cg
    if FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, items, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jm = j < items
        sc = j // Cg
        idx = (n * n_chunks + sc) * C + g * Cg + j % Cg
        cnt = tl.minimum(chunk, HW - sc * chunk).to(acc.dtype)
        pm = tl.load(pmean_ptr + idx, mask=jm, other=0.0)
        acc += tl.where(jm, cnt * pm, 0.0)
    mean = tl.sum(acc, axis=0) / group_size
    acc = acc * 0.0
    for j0 in range(0, items, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jm = j < items
        sc = j // Cg
        idx = (n * n_chunks + sc) * C + g * Cg + j % Cg
        cnt = tl.minimum(chunk, HW - sc * chunk).to(acc.dtype)
        pm = tl.load(pmean_ptr + idx, mask=jm, other=0.0)
        p2 = tl.load(pm2_ptr + idx, mask=jm, other=0.0)
        d = pm - mean
        acc += tl.where(jm, p2 + cnt * d * d, 0.0)
    var = tl.sum(acc, axis=0) / group_size
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _channel_index(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    """(n * C + c) of memory offsets into an NCHW-contiguous or channels_last tensor."""
    if CHANNELS_LAST:
        return (offs // (HW * C)) * C + offs % C
    else:
        return offs // HW


@triton.jit
def _apply_kernel(x_ptr, res_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, total, C, HW, G, Cg, slope,
                  CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    nc = _channel_index(offs, C, HW, CHANNELS_LAST)
    c = nc % C
    ng = (nc // C) * G + c // Cg
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    if FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    mu = tl.load(mean_ptr + ng, mask=m, other=0.0)
    r = tl.load(rstd_ptr + ng, mask=m, other=0.0)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    b = tl.load(b_ptr + c, mask=m, other=0.0)
    y = (_lrelu(x, slope) - mu) * (r * w) + b
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=m, other=0.0).to(y.dtype)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grad_sums_kernel(x_ptr, g_ptr, mean_ptr, psdy_ptr, psg_ptr, C, HW, G, Cg, n_chunks, chunk, stride_n, stride_c,
                      stride_s, slope, FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    sc = tl.program_id(1)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    s_begin = sc * chunk
    s_end = tl.minimum(HW, s_begin + chunk)
    mu = tl.load(mean_ptr + n * G + cs // Cg, mask=cmask, other=0.0)
    if FP64:
        sdy = tl.zeros([BLOCK_C], dtype=tl.float64)
    else:
        sdy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sg = sdy * 0.0
    base = n.to(tl.int64) * stride_n
    for s0 in range(s_begin, s_end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (ss < s_end)[:, None] & cmask[None, :]
        offs = base + ss[:, None].to(tl.int64) * stride_s + cs[None, :] * stride_c
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(sdy.dtype)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(sdy.dtype)
        sdy += tl.sum(g * (_lrelu(x, slope) - mu[None, :]), axis=0)
        sg += tl.sum(g, axis=0)
    out = (n * n_chunks + sc) * C + cs
    tl.store(psdy_ptr + out, sdy, mask=cmask)
    tl.store(psg_ptr + out, sg, mask=cmask)


@triton.jit
def _grad_apply_kernel(x_ptr, g_ptr, dx_ptr, mu_ptr, k1_ptr, k2_ptr, k3_ptr, total, C, HW, slope,
                       CHANNELS_LAST: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    nc = _channel_index(offs, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    if FP64:
        x = x.to(tl.float64)
        g = g.to(tl.float64)
    else:
        x = x.to(tl.float32)
        g = g.to(tl.float32)
    mu = tl.load(mu_ptr + nc, mask=m, other=0.0)
    k1 = tl.load(k1_ptr + nc, mask=m, other=0.0)
    k2 = tl.load(k2_ptr + nc, mask=m, other=0.0)
    k3 = tl.load(k3_ptr + nc, mask=m, other=0.0)
    dy = k1 * g + k2 * (_lrelu(x, slope) - mu) + k3
    dx = tl.where(x > 0, dy, dy * slope)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _layout(x: torch.Tensor) -> bool:
    """True for channels_last, False for NCHW-contiguous; anything else is refused."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError("leaky_relu_group_norm (triton): x must be contiguous or channels_last")


def _tiling(x: torch.Tensor):
    N, C, H, W = x.shape
    HW = H * W
    block_c = min(32, triton.next_power_of_2(C))
    block_s = max(16, min(128, 2048 // block_c, triton.next_power_of_2(HW)))
    n_cb = triton.cdiv(C, block_c)
    want = max(1, triton.cdiv(_TARGET_PROGRAMS, max(1, N * n_cb)))
    chunk = max(block_s, triton.cdiv(triton.cdiv(HW, want), block_s) * block_s)
    n_chunks = triton.cdiv(HW, chunk)
    # strides of (n, c, spatial) in elements; the spatial index runs over h * W + w for both layouts
    sn, sc, _, sw = x.stride()
    return N, C, HW, block_c, block_s, n_cb, chunk, n_chunks, sn, sc, sw


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def leaky_relu_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                          eps: float, slope: float, residual: torch.Tensor | None = None,
                          out: torch.Tensor | None = None):
    """(out, mean, rstd) of group_norm(leaky_relu(x)) [+ residual]; mean/rstd are (N, num_groups) statistics."""
    channels_last = _layout(x)
    if residual is not None and (residual.shape != x.shape or residual.stride() != x.stride()
                                 or residual.dtype != x.dtype):
        raise ValueError("leaky_relu_group_norm (triton): residual must match x in shape, strides and dtype")
    N, C, HW, block_c, block_s, n_cb, chunk, n_chunks, sn, sc, ss = _tiling(x)
    G = num_groups
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
    pmean = torch.empty(N, n_chunks, C, device=x.device, dtype=acc)
    pm2 = torch.empty_like(pmean)
    _partial_moments_kernel[(N, n_chunks, n_cb)](x, pmean, pm2, C, HW, n_chunks, chunk, sn, sc, ss, slope,
                                                 FP64=fp64, BLOCK_S=block_s, BLOCK_C=block_c)
    Cg = C // G
    block = min(1024, triton.next_power_of_2(n_chunks * Cg))
    _group_stats_kernel[(N * G,)](pmean, pm2, mean, rstd, C, HW, G, Cg, n_chunks, chunk, float(Cg * HW), eps,
                                  FP64=fp64,
                                  BLOCK=block)
    w = weight.to(acc).contiguous()
    b = bias.to(acc).contiguous()
    total = x.numel()
    _apply_kernel[(triton.cdiv(total, _ELEM_BLOCK),)](x, x if residual is None else residual, out, mean, rstd, w, b,
                                                      total, C, HW, G, Cg, slope, CHANNELS_LAST=channels_last,
                                                      HAS_RES=residual is not None, FP64=fp64, BLOCK=_ELEM_BLOCK)
    return out, mean, rstd


def leaky_relu_group_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                   rstd: torch.Tensor, num_groups: int, slope: float,
                                   dx: torch.Tensor | None = None):
    """(dx, dweight, dbias) of group_norm(leaky_relu(x)) given the forward's mean/rstd."""
    channels_last = _layout(x)
    g = grad_out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    N, C, HW, block_c, block_s, n_cb, chunk, n_chunks, sn, sc, ss = _tiling(x)
    G = num_groups
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
    psdy = torch.empty(N, n_chunks, C, device=x.device, dtype=acc)
    psg = torch.empty_like(psdy)
    _grad_sums_kernel[(N, n_chunks, n_cb)](x, g, mean, psdy, psg, C, HW, G, Cg, n_chunks, chunk, sn, sc, ss, slope,
                                           FP64=fp64, BLOCK_S=block_s, BLOCK_C=block_c)
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
    total = x.numel()
    _grad_apply_kernel[(triton.cdiv(total, _ELEM_BLOCK),)](x, g, dx, mu, k1, k2, k3, total, C, HW, slope,
                                                           CHANNELS_LAST=channels_last, FP64=fp64,
                                                           BLOCK=_ELEM_BLOCK)
    dw = (r * sdy).sum(0).to(weight.dtype)
    db = sg.sum(0).to(weight.dtype)
    return dx, dw, db
