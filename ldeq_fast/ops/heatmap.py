"""The heatmap ops: the softargmax normalisation (the cell's last op) and the keypoint head (expected
coordinates and spread of each heatmap).

    softargmax_heatmaps(h, beta) -> hm = exp(beta * (h - max_{H,W} h))              (B, K, H, W), peaks at 1
    heatmap_keypoints(hm)        -> keypoints (B, K, 2), spread (B, K), published_uncertainty (B, K)

Each is one op, ``torch.ops.ldeq_fast.{softargmax_heatmaps,heatmap_keypoints}`` (+ ``*_backward`` ops,
autograd registered): CPU kernels in csrc/cpu/heatmap.cpp, CUDA kernels in kernels/heatmap.py (Triton).
The references ``softargmax_heatmaps_ref`` / ``heatmap_keypoints_ref`` are below.  Gradients flow to h, to
a tensor beta (e.g. a learnt per-keypoint softplus(beta_raw)) and to hm through the keypoints and spread
(and the published uncertainty).

The kernels take float32/float64 maps; bfloat16/float16 maps (a conv output under autocast) are computed
in float32, as the reference does; float64 maps give float64 read-outs.
"""
from __future__ import annotations

import torch

from ldeq_fast.ops import (
    define,
    interpreter_autograd,
    resolve,
    run_kernel,
    triton_launcher,
)

DTYPES = (torch.float32, torch.float64)
MASS_EPS = 1e-4  # p = hm / (MASS_EPS + sum hm)
_Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------------
# references

def softargmax_heatmaps_ref(h: _Tensor, beta) -> _Tensor:
    """exp(beta * (h - max_{H,W} h)) per map: heatmaps in (0, 1] peaking at exactly 1.  beta: a float or a
    tensor of shape (), (K,) or (1, K, 1, 1)."""
    if isinstance(beta, torch.Tensor) and beta.dim() == 1:
        beta = beta.view(1, -1, 1, 1)
    return torch.exp(beta * (h - h.amax(dim=(2, 3), keepdim=True)))


def heatmap_keypoints_ref(heatmaps: _Tensor):
    """Expected coordinates of normalised heatmaps, computed in float32 (float64 maps stay float64).

    Returns (keypoints (B,K,2) in [0,1) as (x, y) / H, spread (B,K), published_uncertainty (B,K)).
    ``spread`` is the true RMS spread sqrt(0.5 var_x + 0.5 var_y) / H around the mean (pixel units for both
    terms).  ``published_uncertainty`` reproduces the published formula, which subtracts the normalised mean
    from pixel indices and so measures position rather than spread.
    """
    B, K, H, W = heatmaps.shape
    hm = heatmaps if heatmaps.dtype == torch.float64 else heatmaps.float()
    p = hm / (MASS_EPS + hm.sum(dim=(2, 3), keepdim=True))
    cols = torch.arange(W, device=hm.device, dtype=hm.dtype).view(1, 1, W)
    rows = torch.arange(H, device=hm.device, dtype=hm.dtype).view(1, 1, H)
    px, py = p.sum(dim=2), p.sum(dim=3)          # marginals (B,K,W), (B,K,H)
    mx = (px * cols).sum(-1)                     # mean column, pixels
    my = (py * rows).sum(-1)
    kpts = torch.stack((mx / H, my / H), dim=2)
    var_x = (px * (cols - mx.unsqueeze(-1)) ** 2).sum(-1)
    var_y = (py * (rows - my.unsqueeze(-1)) ** 2).sum(-1)
    spread = torch.sqrt(0.5 * var_x + 0.5 * var_y) / H
    pvx = (px * (cols - (mx / H).unsqueeze(-1)) ** 2).sum(-1)
    pvy = (py * (rows - (my / H).unsqueeze(-1)) ** 2).sum(-1)
    published = torch.sqrt(0.5 * pvx + 0.5 * pvy) / H
    return kpts, spread, published


# --------------------------------------------------------------------------------------------------------
# argument checks

def _check_maps(t, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (B, K, H, W), got shape {tuple(t.shape)}")
    if t.shape[2] < 1 or t.shape[3] < 1:
        raise ValueError(f"{op}: {name} must have H, W >= 1, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _beta_vector(beta, h: _Tensor, op: str) -> _Tensor:
    """beta as a (K,) tensor of h's dtype (differentiable when beta is a tensor)."""
    K = h.shape[1]
    if isinstance(beta, bool) or not isinstance(beta, (int, float, torch.Tensor)):
        raise TypeError(f"{op}: beta must be a float or a tensor, got {type(beta).__name__}")
    if not isinstance(beta, torch.Tensor):
        return torch.full((K,), float(beta), dtype=h.dtype, device=h.device)
    if not beta.is_floating_point():
        raise TypeError(f"{op}: beta must be floating point, got {beta.dtype}")
    if beta.device != h.device:
        raise ValueError(f"{op}: beta is on {beta.device} but h is on {h.device}")
    if beta.dim() == 0:
        return beta.to(h.dtype).expand(K).contiguous()
    if tuple(beta.shape) not in ((K,), (1, K, 1, 1)):
        raise ValueError(f"{op}: beta must be a scalar, (K,) or (1, K, 1, 1) with K={K}, got {tuple(beta.shape)}")
    return beta.reshape(K).to(h.dtype).contiguous()


def _fp32_at_least(t):
    """Low-precision maps are computed in float32 (exp of a max-shifted map, moments: fp32 statistics)."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16):
        return t.float()
    return t


# --------------------------------------------------------------------------------------------------------
# the ops

def _softargmax_fake(h, beta):
    return torch.empty_like(h), h.new_empty(h.shape[0], h.shape[1])


def _softargmax_backward_fake(g_hm, h, beta, hm, hmax):
    return torch.empty_like(h), torch.empty_like(beta)


def _keypoints_fake(hm):
    B, K = hm.shape[:2]
    return hm.new_empty(B, K, 2), hm.new_empty(B, K), hm.new_empty(B, K), hm.new_empty(B, K)


def _keypoints_backward_fake(g_kpts, g_spread, g_published, hm, kpts, spread, published, mass):
    return torch.empty_like(hm)


# the Triton launchers (kernels/heatmap.py), imported on first call
_LAUNCH_SOFTARGMAX = triton_launcher("heatmap", "softargmax_heatmaps")
_LAUNCH_SOFTARGMAX_BACKWARD = triton_launcher("heatmap", "softargmax_heatmaps_backward")
_LAUNCH_KEYPOINTS = triton_launcher("heatmap", "heatmap_keypoints")
_LAUNCH_KEYPOINTS_BACKWARD = triton_launcher("heatmap", "heatmap_keypoints_backward")

SOFTARGMAX = define("softargmax_heatmaps", "(Tensor h, Tensor beta) -> (Tensor, Tensor)", fake=_softargmax_fake,
                    cuda=_LAUNCH_SOFTARGMAX)
SOFTARGMAX_BACKWARD = define("softargmax_heatmaps_backward",
                             "(Tensor g_hm, Tensor h, Tensor beta, Tensor hm, Tensor hmax) -> (Tensor, Tensor)",
                             fake=_softargmax_backward_fake,
                             cuda=_LAUNCH_SOFTARGMAX_BACKWARD)
KEYPOINTS = define("heatmap_keypoints", "(Tensor hm) -> (Tensor, Tensor, Tensor, Tensor)", fake=_keypoints_fake,
                   cuda=_LAUNCH_KEYPOINTS)
KEYPOINTS_BACKWARD = define("heatmap_keypoints_backward",
                            "(Tensor g_kpts, Tensor g_spread, Tensor g_published, Tensor hm, Tensor kpts, "
                            "Tensor spread, Tensor published, Tensor mass) -> Tensor",
                            fake=_keypoints_backward_fake, cuda=_LAUNCH_KEYPOINTS_BACKWARD)


def _softargmax_setup(ctx, inputs, output):
    h, beta = inputs
    hm, hmax = output
    ctx.save_for_backward(h, beta, hm, hmax)
    ctx.mark_non_differentiable(hmax)


def _softargmax_backward_with(backward_kernel):
    """The backward of softargmax_heatmaps, running ``backward_kernel`` (the backward op, or its Triton launcher
    on the interpreter path)."""
    def backward(ctx, g_hm, _g_hmax):
        h, beta, hm, hmax = ctx.saved_tensors
        return backward_kernel(g_hm.contiguous(), h, beta, hm, hmax)

    return backward


def _keypoints_setup(ctx, inputs, output):
    (hm,) = inputs
    kpts, spread, published, mass = output
    ctx.save_for_backward(hm, kpts, spread, published, mass)
    ctx.mark_non_differentiable(mass)


def _keypoints_backward_with(backward_kernel):
    """The backward of heatmap_keypoints, running ``backward_kernel`` (the backward op, or its Triton launcher on
    the interpreter path)."""
    def backward(ctx, g_kpts, g_spread, g_published, _g_mass):
        hm, kpts, spread, published, mass = ctx.saved_tensors

        def grad(g, like):  # the gradient of an output that did not reach the loss may arrive as None
            return torch.zeros_like(like) if g is None else g.to(hm.dtype).contiguous()

        return backward_kernel(grad(g_kpts, kpts), grad(g_spread, spread), grad(g_published, published), hm, kpts,
                               spread, published, mass)

    return backward


torch.library.register_autograd("ldeq_fast::softargmax_heatmaps", _softargmax_backward_with(SOFTARGMAX_BACKWARD),
                                setup_context=_softargmax_setup)
torch.library.register_autograd("ldeq_fast::heatmap_keypoints", _keypoints_backward_with(KEYPOINTS_BACKWARD),
                                setup_context=_keypoints_setup)
_SOFTARGMAX_INTERPRETED = interpreter_autograd(
    "softargmax_heatmaps", _LAUNCH_SOFTARGMAX, _softargmax_setup,
    _softargmax_backward_with(_LAUNCH_SOFTARGMAX_BACKWARD))
_KEYPOINTS_INTERPRETED = interpreter_autograd(
    "heatmap_keypoints", _LAUNCH_KEYPOINTS, _keypoints_setup,
    _keypoints_backward_with(_LAUNCH_KEYPOINTS_BACKWARD))


# --------------------------------------------------------------------------------------------------------
# public API

def softargmax_heatmaps(h: _Tensor, beta, *, backend: str | None = None) -> _Tensor:
    """hm = exp(beta * (h - max_{H,W} h)) per (batch, keypoint) map: heatmaps in (0, 1] peaking at 1.

    h: (B, K, H, W) float32/float64 (bfloat16/float16 is computed and returned in float32).  beta: a float,
    or a tensor of shape (), (K,) or (1, K, 1, 1) (differentiable).  ``backend``: see ``ldeq_fast.ops.resolve``.
    """
    op = "softargmax_heatmaps"
    h = _fp32_at_least(h)
    _check_maps(h, op, "h")
    beta_k = _beta_vector(beta, h, op)
    chosen = resolve(op, h, backend)
    if chosen == "torch":
        return softargmax_heatmaps_ref(h, beta)
    args = (h.contiguous(), beta_k)
    return run_kernel(chosen, SOFTARGMAX, _LAUNCH_SOFTARGMAX, _SOFTARGMAX_INTERPRETED, args)[0]


def heatmap_keypoints(hm: _Tensor, *, backend: str | None = None):
    """(keypoints (B, K, 2) = (x, y) / H, spread (B, K), published_uncertainty (B, K)) of heatmaps, exactly as
    ``heatmap_keypoints_ref``; differentiable w.r.t. hm."""
    op = "heatmap_keypoints"
    hm = _fp32_at_least(hm)
    _check_maps(hm, op, "hm")
    chosen = resolve(op, hm, backend)
    if chosen == "torch":
        return heatmap_keypoints_ref(hm)
    return tuple(run_kernel(chosen, KEYPOINTS, _LAUNCH_KEYPOINTS, _KEYPOINTS_INTERPRETED,
                            (hm.contiguous(),))[:3])
