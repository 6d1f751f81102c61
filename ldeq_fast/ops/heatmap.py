"""The heatmap head: softargmax normalisation (the cell's last op) and the expected-coordinate read-out,
fused.  References are layers.py's ``softargmax_normalize`` and ``heatmaps_to_keypoints``.

    softargmax_heatmaps(h, beta) -> hm = exp(beta * (h - max_{H,W} h))              (B, K, H, W)
    heatmap_keypoints(hm)        -> keypoints (B, K, 2), spread (B, K), published_uncertainty (B, K)
    heatmap_head(h, beta)        -> (hm, keypoints, spread, published_uncertainty), one pass per map

Backends: 'cpp' (csrc/cpu/heatmap.cpp), 'triton' (kernels/heatmap.py; GPU, or CPU under
TRITON_INTERPRET=1) and 'torch' (the references).  The fused backends go through the custom ops
``ldeq_fast::softargmax_heatmaps``, ``ldeq_fast::heatmap_keypoints``, ``ldeq_fast::heatmap_head`` and
their ``*_backward`` ops (fake impls and autograd registered).  Gradients flow to h, to a tensor beta
(e.g. a learnt per-keypoint softplus(beta_raw)) and, for ``heatmap_keypoints``, to hm through the
keypoints and spread (and the published uncertainty).

Differences from the references: the fused kernels take float32/float64 maps (``heatmap_keypoints``
casts bfloat16/float16 to float32 as the reference does) and return the read-outs in the maps' dtype,
so float64 maps give float64 read-outs where the reference always computes in float32.
"""
from __future__ import annotations

import torch

from ldeq_fast.model.layers import heatmaps_to_keypoints, softargmax_normalize
from ldeq_fast.ops import cpp_ops_present, direct_call_ok, load_triton_kernels, pick_backend

_CPP_OPS = ("softargmax_heatmaps_cpu", "heatmap_keypoints_cpu", "heatmap_head_cpu", "heatmap_keypoints_backward_cpu",
            "heatmap_head_backward_cpu")
SUPPORTS = ("triton", "cpp") if cpp_ops_present(*_CPP_OPS) else ("triton",)
DTYPES = (torch.float32, torch.float64)
_Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------------
# references

def _beta_view(beta):
    if isinstance(beta, torch.Tensor) and beta.dim() == 1:
        return beta.view(1, -1, 1, 1)
    return beta


def softargmax_heatmaps_ref(h: _Tensor, beta) -> _Tensor:
    return softargmax_normalize(h, _beta_view(beta))


def heatmap_keypoints_ref(hm: _Tensor):
    return heatmaps_to_keypoints(hm)


def heatmap_head_ref(h: _Tensor, beta):
    hm = softargmax_heatmaps_ref(h, beta)
    return (hm, *heatmaps_to_keypoints(hm))


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
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")


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


# --------------------------------------------------------------------------------------------------------
# custom ops

def _cpp():
    return torch.ops.ldeq_fast


def _triton():
    return load_triton_kernels("heatmap")


def _need_fused(backend: str, op: str) -> None:
    if backend not in ("cpp", "triton"):
        raise ValueError(f"{op}: no fused kernel for backend {backend!r}")


@torch.library.custom_op("ldeq_fast::softargmax_heatmaps", mutates_args=())
def _softargmax_op(h: _Tensor, beta: _Tensor, backend: str) -> tuple[_Tensor, _Tensor]:
    _need_fused(backend, "softargmax_heatmaps")
    if backend == "cpp":
        return _cpp().softargmax_heatmaps_cpu(h, beta)
    return _triton().softargmax_heatmaps(h, beta)


@_softargmax_op.register_fake
def _(h, beta, backend):
    return torch.empty_like(h), h.new_empty(h.shape[0], h.shape[1])


@torch.library.custom_op("ldeq_fast::heatmap_keypoints", mutates_args=())
def _keypoints_op(hm: _Tensor, backend: str) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor]:
    _need_fused(backend, "heatmap_keypoints")
    if backend == "cpp":
        return _cpp().heatmap_keypoints_cpu(hm)
    return _triton().heatmap_keypoints(hm)


@_keypoints_op.register_fake
def _(hm, backend):
    B, K = hm.shape[:2]
    return hm.new_empty(B, K, 2), hm.new_empty(B, K), hm.new_empty(B, K), hm.new_empty(B, K)


@torch.library.custom_op("ldeq_fast::heatmap_head", mutates_args=())
def _head_op(h: _Tensor, beta: _Tensor, backend: str) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor]:
    _need_fused(backend, "heatmap_head")
    if backend == "cpp":
        return _cpp().heatmap_head_cpu(h, beta)
    hm, hmax = _triton().softargmax_heatmaps(h, beta)
    return (hm, *_triton().heatmap_keypoints(hm)[:3], hmax, _triton().heatmap_keypoints(hm)[3])


@_head_op.register_fake
def _(h, beta, backend):
    B, K = h.shape[:2]
    return (torch.empty_like(h), h.new_empty(B, K, 2), h.new_empty(B, K), h.new_empty(B, K), h.new_empty(B, K),
            h.new_empty(B, K))


@torch.library.custom_op("ldeq_fast::heatmap_head_backward", mutates_args=())
def _head_backward_op(g_hm: _Tensor, h: _Tensor, beta: _Tensor, hm: _Tensor, hmax: _Tensor, g_kpts: _Tensor | None,
                      g_spread: _Tensor | None, g_published: _Tensor | None, kpts: _Tensor | None,
                      spread: _Tensor | None, published: _Tensor | None, mass: _Tensor | None,
                      backend: str) -> tuple[_Tensor, _Tensor]:
    _need_fused(backend, "heatmap_head_backward")
    if backend == "cpp":
        return _cpp().heatmap_head_backward_cpu(g_hm, h, beta, hm, hmax, g_kpts, g_spread, g_published, kpts, spread,
                                                published, mass)
    if g_kpts is not None:
        g_hm = g_hm + _triton().heatmap_keypoints_backward(g_kpts, g_spread, g_published, hm, kpts, spread, published,
                                                           mass)
    return _triton().softargmax_heatmaps_backward(g_hm, h, beta, hm, hmax)


@_head_backward_op.register_fake
def _(g_hm, h, beta, hm, hmax, g_kpts, g_spread, g_published, kpts, spread, published, mass, backend):
    return torch.empty_like(h), torch.empty_like(beta)


@torch.library.custom_op("ldeq_fast::heatmap_keypoints_backward", mutates_args=())
def _keypoints_backward_op(g_kpts: _Tensor, g_spread: _Tensor, g_published: _Tensor, hm: _Tensor, kpts: _Tensor,
                           spread: _Tensor, published: _Tensor, mass: _Tensor, backend: str) -> _Tensor:
    _need_fused(backend, "heatmap_keypoints_backward")
    if backend == "cpp":
        return _cpp().heatmap_keypoints_backward_cpu(g_kpts, g_spread, g_published, hm, kpts, spread, published, mass)
    return _triton().heatmap_keypoints_backward(g_kpts, g_spread, g_published, hm, kpts, spread, published, mass)


@_keypoints_backward_op.register_fake
def _(g_kpts, g_spread, g_published, hm, kpts, spread, published, mass, backend):
    return torch.empty_like(hm)


def _small(g: _Tensor, like: _Tensor) -> _Tensor:
    return g.to(like.dtype).contiguous()


def _softargmax_setup(ctx, inputs, output):
    h, beta, backend = inputs
    hm, hmax = output
    ctx.save_for_backward(h, beta, hm, hmax)
    ctx.backend = backend
    ctx.mark_non_differentiable(hmax)


def _softargmax_backward(ctx, g_hm, _g_hmax):
    h, beta, hm, hmax = ctx.saved_tensors
    dh, dbeta = _head_backward_op(g_hm, h, beta, hm, hmax, None, None, None, None, None, None, None, ctx.backend)
    return dh, dbeta, None


_softargmax_op.register_autograd(_softargmax_backward, setup_context=_softargmax_setup)


def _keypoints_setup(ctx, inputs, output):
    hm, backend = inputs
    kpts, spread, published, mass = output
    ctx.save_for_backward(hm, kpts, spread, published, mass)
    ctx.backend = backend
    ctx.mark_non_differentiable(mass)


def _keypoints_backward(ctx, g_kpts, g_spread, g_published, _g_mass):
    hm, kpts, spread, published, mass = ctx.saved_tensors
    dhm = _keypoints_backward_op(_small(g_kpts, hm), _small(g_spread, hm), _small(g_published, hm), hm, kpts, spread,
                                 published, mass, ctx.backend)
    return dhm, None


_keypoints_op.register_autograd(_keypoints_backward, setup_context=_keypoints_setup)


def _head_setup(ctx, inputs, output):
    h, beta, backend = inputs
    hm, kpts, spread, published, hmax, mass = output
    ctx.save_for_backward(h, beta, hm, kpts, spread, published, hmax, mass)
    ctx.backend = backend
    ctx.mark_non_differentiable(hmax, mass)


def _head_backward(ctx, g_hm, g_kpts, g_spread, g_published, _g_hmax, _g_mass):
    h, beta, hm, kpts, spread, published, hmax, mass = ctx.saved_tensors
    dh, dbeta = _head_backward_op(g_hm, h, beta, hm, hmax, _small(g_kpts, h), _small(g_spread, h),
                                  _small(g_published, h), kpts, spread, published, mass, ctx.backend)
    return dh, dbeta, None


_head_op.register_autograd(_head_backward, setup_context=_head_setup)

if "cpp" in SUPPORTS:
    @torch.library.register_fake("ldeq_fast::softargmax_heatmaps_cpu")
    def _(h, beta):
        return torch.empty_like(h), h.new_empty(h.shape[0], h.shape[1])

    @torch.library.register_fake("ldeq_fast::heatmap_keypoints_cpu")
    def _(hm):
        B, K = hm.shape[:2]
        return hm.new_empty(B, K, 2), hm.new_empty(B, K), hm.new_empty(B, K), hm.new_empty(B, K)

    @torch.library.register_fake("ldeq_fast::heatmap_head_cpu")
    def _(h, beta):
        B, K = h.shape[:2]
        return (torch.empty_like(h), h.new_empty(B, K, 2), h.new_empty(B, K), h.new_empty(B, K), h.new_empty(B, K),
                h.new_empty(B, K))

    @torch.library.register_fake("ldeq_fast::heatmap_keypoints_backward_cpu")
    def _(g_kpts, g_spread, g_published, hm, kpts, spread, published, mass):
        return torch.empty_like(hm)

    @torch.library.register_fake("ldeq_fast::heatmap_head_backward_cpu")
    def _(g_hm, h, beta, hm, hmax, g_kpts, g_spread, g_published, kpts, spread, published, mass):
        return torch.empty_like(h), torch.empty_like(beta)


# --------------------------------------------------------------------------------------------------------
# public API

def softargmax_heatmaps(h: _Tensor, beta, *, backend: str | None = None) -> _Tensor:
    """hm = exp(beta * (h - max_{H,W} h)) per (batch, keypoint) map: heatmaps in (0, 1] peaking at 1.

    h: (B, K, H, W) float32/float64 (bfloat16/float16, e.g. a conv output under autocast, is computed and
    returned in float32).  beta: a float, or a tensor of shape (), (K,) or (1, K, 1, 1) (differentiable).
    ``backend`` as for every ldeq_fast op (see ``pick_backend``).
    """
    if isinstance(h, torch.Tensor) and h.dtype in (torch.bfloat16, torch.float16):
        h = h.float()  # exp of a max-shifted map: fp32 statistics
    _check_maps(h, "softargmax_heatmaps", "h")
    beta_k = _beta_vector(beta, h, "softargmax_heatmaps")
    chosen = pick_backend(h, backend, SUPPORTS)
    if chosen == "torch":
        return softargmax_heatmaps_ref(h, beta)
    if direct_call_ok(h, beta_k):
        if chosen == "cpp":
            return _cpp().softargmax_heatmaps_cpu(h.contiguous(), beta_k)[0]
        return _triton().softargmax_heatmaps(h.contiguous(), beta_k)[0]
    return _softargmax_op(h.contiguous(), beta_k, chosen)[0]


def heatmap_keypoints(hm: _Tensor, *, backend: str | None = None):
    """(keypoints (B, K, 2) = (x, y) / H, spread (B, K), published_uncertainty (B, K)) of heatmaps,
    exactly as ``heatmaps_to_keypoints``; differentiable w.r.t. hm."""
    if isinstance(hm, torch.Tensor) and hm.dtype in (torch.bfloat16, torch.float16):
        hm = hm.float()  # the reference computes in float32 too
    _check_maps(hm, "heatmap_keypoints", "hm")
    chosen = pick_backend(hm, backend, SUPPORTS)
    if chosen == "torch":
        return heatmap_keypoints_ref(hm)
    if direct_call_ok(hm):
        if chosen == "cpp":
            return tuple(_cpp().heatmap_keypoints_cpu(hm.contiguous())[:3])
        return _triton().heatmap_keypoints(hm.contiguous())[:3]
    return _keypoints_op(hm.contiguous(), chosen)[:3]


def heatmap_head(h: _Tensor, beta, *, backend: str | None = None):
    """``softargmax_heatmaps`` then ``heatmap_keypoints`` in one pass per map:
    returns (heatmaps, keypoints, spread, published_uncertainty)."""
    _check_maps(h, "heatmap_head", "h")
    beta_k = _beta_vector(beta, h, "heatmap_head")
    chosen = pick_backend(h, backend, SUPPORTS)
    if chosen == "torch":
        return heatmap_head_ref(h, beta)
    if direct_call_ok(h, beta_k):
        if chosen == "cpp":
            return tuple(_cpp().heatmap_head_cpu(h.contiguous(), beta_k)[:4])
        hm, _hmax = _triton().softargmax_heatmaps(h.contiguous(), beta_k)
        return (hm, *_triton().heatmap_keypoints(hm)[:3])
    return _head_op(h.contiguous(), beta_k, chosen)[:4]
