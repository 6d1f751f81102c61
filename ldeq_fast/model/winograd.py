"""Winograd convolution F(4x4, 5x5) for the cell's 5x5 convolutions in CPU inference.

The hourglass's four 5x5 convolutions are ~60% of a cell evaluation's FLOPs.  Winograd's minimal filtering
computes each 4x4 output tile from an 8x8 input tile with 64 multiplies per (input, output) channel pair
instead of 400: the transformed input (64, C, tiles) times the transformed weights (64, K, C) is 64 GEMMs
with 6.25x fewer FLOPs than the direct convolution, plus two small transforms.  Here every step is a dense
matrix product (each transform as two products over all tiles at once) so MKL runs all of it; whether that beats oneDNN's
direct convolution depends on the CPU and the shape, so ldeq_fast/model/cpu_tuning.py measures it per layer
(and checks its rounding against the direct convolution before it may be chosen).

Interpolation points 0, +-1, +-2, +-1/2 and infinity (the usual choice for F(4, 5)); matrices in float64,
used in float32.  Rounding: ~3x that of a direct float32 convolution (relative 1e-5 of the output's range).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

M, R = 4, 5                      # output tile, kernel size
ALPHA = M + R - 1                # input tile
POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)
PROFILE_NAME = "ldeq_fast::winograd_conv5x5"


def _vandermonde(points, n: int) -> np.ndarray:
    """Evaluation matrix of polynomials with n coefficients at ``points`` and at infinity (the top one)."""
    rows = [[p ** j for j in range(n)] for p in points] + [[0.0] * (n - 1) + [1.0]]
    return np.array(rows, dtype=np.float64)


@functools.lru_cache(maxsize=None)
def transforms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T (M x ALPHA), G (ALPHA x R), B^T (ALPHA x ALPHA)) of F(M, R): correlation is the transpose of the
    Toom-Cook polynomial product s = V_s^-1 [(V_g g) * (V_h h)], so y = V_h^T [(V_g g) * (V_s^-T d)]."""
    vg, vh, vs = _vandermonde(POINTS, R), _vandermonde(POINTS, M), _vandermonde(POINTS, ALPHA)
    return vh.T.copy(), vg, np.linalg.inv(vs).T.copy()


def supports(conv: torch.nn.Conv2d, height: int, width: int) -> bool:
    """A stride-1, 5x5, 'same'-padded, ungrouped conv on a map whose sides are multiples of 4."""
    return (tuple(conv.kernel_size) == (R, R) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (2, 2)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and height % M == 0 and width % M == 0)


# the same matrices as float64 tensors, made once at import: torch.compile traces transform_weight into its
# graph (a numpy call or an lru_cache would not trace), where they are constants
_AT64, _G64, _BT64 = (torch.from_numpy(np.ascontiguousarray(t)) for t in transforms())


def transform_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (ALPHA^2, K, C), B^T (ALPHA, ALPHA), A^T (M, ALPHA)) for a (K, C, 5, 5) weight, in its dtype
    (computed in float64).  Plain torch ops, so it also runs inside a torch.compile graph."""
    dev = weight.device
    g = _G64.to(dev)
    w = weight.detach().to(torch.float64)
    u = torch.einsum("ij,kcjl,ml->imkc", g, w, g).reshape(ALPHA * ALPHA, w.shape[0], w.shape[1])
    like = dict(device=dev, dtype=weight.dtype)
    return u.to(**like).contiguous(), _BT64.to(**like), _AT64.to(**like)


def _both_sides(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a @ t_n @ a^T for every n of t (n_in, n_in, N): two matrix products over the whole batch of tiles."""
    n_in, n = a.shape[1], t.shape[-1]
    y = (a @ t.reshape(n_in, n_in * n)).view(-1, n_in, n).transpose(0, 1).reshape(n_in, -1)
    return (a @ y).view(a.shape[0], -1, n).transpose(0, 1)


def conv5x5(x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """The 'same' 5x5 convolution of x (B, C, H, W) with a ``transform_weight`` result; NCHW output.  One image
    at a time: the transformed tiles of one image stay in cache (at batch 8 the whole batch's would not)."""
    if torch.compiler.is_compiling():
        # traced: the whole batch at once (no loop over a batch size that may be symbolic, no profiler range)
        return _conv5x5(x, prepared, bias)
    with torch.profiler.record_function(PROFILE_NAME):    # so a profile counts its GEMMs as convolution time
        if x.shape[0] == 1:
            return _conv5x5(x, prepared, bias)
        out = x.new_empty(x.shape[0], prepared[0].shape[1], x.shape[2], x.shape[3])
        for i in range(x.shape[0]):
            out[i:i + 1] = _conv5x5(x[i:i + 1], prepared, bias)
        return out


def _conv5x5(x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
    u, bt, at = prepared
    b, c, h, w = x.shape
    k = u.shape[1]
    th, tw = h // M, w // M
    # 8x8 input tiles at stride 4, laid out (8, 8, C * B * tiles): one copy (the tiles' im2col)
    d = F.pad(x, (2, 2, 2, 2)).unfold(2, ALPHA, M).unfold(3, ALPHA, M)          # B, C, th, tw, 8, 8 (a view)
    d = d.permute(4, 5, 1, 0, 2, 3).reshape(ALPHA, ALPHA, c * b * th * tw)
    v = _both_sides(d, bt).reshape(ALPHA * ALPHA, c, b * th * tw)               # B^T d B per tile
    m = torch.bmm(u, v)                                                          # ALPHA^2, K, B * tiles
    y = _both_sides(m.view(ALPHA, ALPHA, k * b * th * tw), at)                   # A^T m A per tile
    y = y.reshape(M, M, k, b, th, tw).permute(3, 2, 4, 0, 5, 1)                  # B, K, th, 4, tw, 4
    out = y.reshape(b, k, h, w) if bias is None else (y + bias.view(1, k, 1, 1, 1, 1)).reshape(b, k, h, w)
    return out
