"""The Triton launchers of kernels/ against the plain-PyTorch references in ldeq_fast/ops/, called directly
(no dispatch): the heatmap kernels (one kernel per op, row x column tiles), the LeakyReLU -> GroupNorm kernels
(tile passes without per-element division, statistics split across programs) and the Anderson kernels.

Odd and minimal shapes (batch 1, channels not a multiple of the tile, H = W = 1, maps wider than a tile,
more than one tile per map), both layouts, and every uninitialised tensor NaN-filled so that an element a
kernel forgets to write fails.  On CPU these run in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py);
with a GPU they run on CUDA tensors in-process.
"""
from __future__ import annotations

import os

import pytest
import torch

from ldeq_fast.ops import anderson as A
from ldeq_fast.ops import heatmap as hmo
from ldeq_fast.ops import leaky_relu_group_norm as gno
from ldeq_fast.ops import load_triton_kernels, triton_available

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


@pytest.fixture
def triton_kernels(nan_empty):
    """Loader of the kernel modules, outputs NaN-filled (the fixture's name marks these tests 'triton' for the
    GPU suite)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py) or on a GPU")
    assert torch.empty(4, device=DEVICE).isnan().all()
    return load_triton_kernels


def _close(got, want, tol, what, scale=0.0):
    """max |got - want| <= tol * max(max |want|, scale): ``scale`` is the quantity's natural size where the
    true value can be ~0 (the gradients of a one-element group)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double().cpu(), want.double().cpu()
    assert not got.isnan().any(), f"{what}: NaN (an element not written)"
    err = ((got - want).abs().max() / want.abs().max().clamp_min(max(scale, 1e-12))).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:g}"


# --------------------------------------------------------------------------------------------------------
# heatmaps

HEATMAP_SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (2, 3, 17, 23), (1, 2, 33, 40), (1, 1, 2, 1100)]


@pytest.mark.parametrize("shape", HEATMAP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_heatmap_launchers_match_reference(shape, dtype, triton_kernels):
    k = triton_kernels("heatmap")
    g = torch.Generator().manual_seed(sum(shape))
    B, K, H, W = shape
    h = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(DEVICE)
    h[0, 0].view(-1)[: min(2, H * W)] = h[0, 0].max()               # a tie at the max
    beta = (0.5 + torch.rand(K, generator=g, dtype=torch.float64)).to(DEVICE)
    g_hm, g_k, g_s, g_p = (torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE)
                           for s in (shape, (B, K, 2), (B, K), (B, K)))
    # a one-pixel map has zero spread: the square roots have no gradient there, only the keypoints' is checked
    n_out = 1 if H * W == 1 else 3
    if n_out == 1:
        g_s.zero_()
        g_p.zero_()
    tol = 1e-5 if dtype == torch.float32 else 1e-10

    # forward: references in float64
    hm, hmax = k.softargmax_heatmaps(h.to(dtype), beta.to(dtype))
    want_hm = hmo.softargmax_heatmaps_ref(h, beta)
    _close(hm, want_hm, tol, "softargmax hm")
    _close(hmax, h.amax(dim=(2, 3)), tol, "softargmax hmax")
    kpts, spread, published, mass = k.heatmap_keypoints(want_hm.to(dtype))
    ref = hmo.heatmap_keypoints_ref(want_hm)
    for got, want, what in zip((kpts, spread, published), ref, ("keypoints", "spread", "published")):
        _close(got, want, 1e-5, what)  # the reference reads out in float32
    _close(mass, want_hm.sum(dim=(2, 3)), tol, "mass")

    # backward against autograd through the float64 references
    hr, br = h.clone().requires_grad_(), beta.clone().requires_grad_()
    (hmo.softargmax_heatmaps_ref(hr, br) * g_hm).sum().backward()
    dh, dbeta = k.softargmax_heatmaps_backward(g_hm.to(dtype), h.to(dtype), beta.to(dtype), hm, hmax)
    _close(dh, hr.grad, tol, "softargmax dh")
    _close(dbeta, br.grad, tol, "softargmax dbeta")
    mr = want_hm.clone().requires_grad_()
    out = hmo.heatmap_keypoints_ref(mr.double())
    (sum((o.double() * w).sum() for o, w in zip(out[:n_out], (g_k, g_s, g_p)))).backward()
    dhm = k.heatmap_keypoints_backward(g_k.to(dtype), g_s.to(dtype), g_p.to(dtype), want_hm.to(dtype), kpts, spread,
                                       published, mass)
    _close(dhm, mr.grad, 1e-4, "keypoints dhm")


# --------------------------------------------------------------------------------------------------------
# LeakyReLU -> GroupNorm

NORM_SHAPES = [  # (N, C, H, W, groups)
    (2, 3, 1, 1, 1), (2, 1, 1, 1, 1), (1, 7, 3, 3, 7), (2, 6, 5, 3, 2), (1, 5, 17, 17, 1), (3, 40, 9, 7, 4), (1, 37, 20, 20, 1)]


def _norm_inputs(shape, dtype, channels_last):
    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(N * 1000 + C * 10 + H)
    x = (torch.randn(N, C, H, W, generator=g, dtype=torch.float64) + 0.3).to(DEVICE)
    w = (1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(DEVICE)
    b = (0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(DEVICE)
    res = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(DEVICE)
    grad = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(DEVICE)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(dtype).contiguous(memory_format=fmt) for t in (x, res, grad)] + [w, b, G]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_norm_launchers_match_reference(shape, channels_last, dtype, triton_kernels):
    k = triton_kernels("leaky_relu_group_norm")
    x, res, grad, w, b, G = _norm_inputs(shape, dtype, channels_last)
    # float64 truth from the reference with autograd
    xr, wr, br = x.double().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    want = gno.leaky_relu_group_norm_ref(xr, wr, br, G, 1e-5, 0.01, residual=res.double())
    want.backward(grad.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    wt, bt = w.to(gno.stats_dtype(dtype)), b.to(gno.stats_dtype(dtype))
    out, mean, rstd = k.leaky_relu_group_norm(x, wt, bt, G, 1e-5, 0.01, residual=res)
    assert out.stride() == x.stride() and out.dtype == dtype
    _close(out, want, tol, "out")
    y = torch.nn.functional.leaky_relu(x.double(), 0.01).reshape(x.shape[0], G, -1)
    _close(mean, y.mean(-1), tol, "mean")
    _close(rstd, 1 / (y.var(-1, unbiased=False) + 1e-5).sqrt(), tol, "rstd")
    dx, dw, db = k.leaky_relu_group_norm_backward(grad, x, wt, mean, rstd, G, 0.01)
    assert dx.stride() == x.stride()
    gtol = tol if dtype != torch.bfloat16 else 5e-2
    g_max = grad.double().abs().max().item()
    _close(dx, xr.grad, gtol, "dx", scale=g_max * rstd.double().max().item() * w.abs().max().item())
    _close(dw, wr.grad, gtol, "dweight", scale=g_max * x[0, 0].numel() * x.shape[0])
    _close(db, br.grad, gtol, "dbias")


def test_norm_statistics_split_over_programs(triton_kernels):
    """At batch 1 one image's reduction is split over many programs (several spatial chunks and channel
    blocks per group) and merged: the statistics do not depend on the split."""
    k = triton_kernels("leaky_relu_group_norm")
    x, res, grad, w, b, _ = _norm_inputs((1, 70, 40, 40, 1), torch.float32, False)
    chunk, n_chunks = k._chunking(1 * 3, 40 * 40, k._tile(70, 1600)[0])
    assert n_chunks > 1  # the case under test: several chunks per image
    out, mean, rstd = k.leaky_relu_group_norm(x, w.float(), b.float(), 1, 1e-5, 0.01)
    _close(out, gno.leaky_relu_group_norm_ref(x.double(), w, b, 1, 1e-5, 0.01), 1e-5, "out")


# --------------------------------------------------------------------------------------------------------
# Anderson

ANDERSON_SHAPES = [(1, 1, 1), (3, 37, 4), (2, 300, 6)]  # (B, D, m)


@pytest.mark.parametrize("B,D,m", ANDERSON_SHAPES)
def test_anderson_launchers_match_reference(B, D, m, triton_kernels):
    upd, step, mix = (triton_kernels(n) for n in ("anderson_update", "anderson_step", "anderson_mix"))
    g = torch.Generator().manual_seed(B * D + m)

    def state(k):
        x = torch.randn(B, D, generator=g).to(DEVICE)
        F = torch.randn(B, m, D, generator=g).to(DEVICE)
        G = torch.randn(B, m, D, generator=g).to(DEVICE)
        gram = torch.randn(B, m, m, generator=g)
        gram = (gram @ gram.transpose(1, 2)).to(DEVICE)
        flags = torch.zeros(4, B, dtype=torch.bool, device=DEVICE)
        flags[0] = True
        flags[3, 0] = True
        stat = torch.full((4, B), float("inf"), device=DEVICE)
        stat[3] = float("nan") if k == 0 else 1.0  # the first residual, set at k = 0
        return x, F, G, gram, flags, stat, torch.zeros(B, dtype=torch.int64, device=DEVICE), \
            torch.full((6, B), float("nan"), device=DEVICE)

    fx = torch.randn(B, D, generator=g).to(DEVICE)
    for k in range(min(5, 2 * m)):
        slot, n = k % m, min(k + 1, m)
        a = state(k)
        b = [t.clone() for t in a]
        norms = upd.anderson_update(fx, a[0], a[1], a[2], a[3], a[4][0], slot, n)
        want_norms = A.anderson_update_ref(fx, b[0], b[1], b[2], b[3], b[4][0], slot, n)
        _close(norms, want_norms, 1e-5, "update norms")
        for got, want, what in zip(a[1:4], b[1:4], ("F", "G", "gram")):
            _close(got, want, 1e-5, f"update {what}")
        args = (k, n, 1e-3, True, 1e-4, True, 1e4)
        alpha = step.anderson_step(a[3], norms, a[4], a[5], a[6], a[7], *args)
        want_alpha = A.anderson_step_ref(b[3], want_norms, b[4], b[5], b[6], b[7], *args)
        _close(alpha, want_alpha, 1e-5, "step alpha")
        assert torch.equal(a[4], b[4]) and torch.equal(a[6], b[6])
        best_a, best_b = a[0].clone(), b[0].clone()
        for beta in (1.0, 0.7):
            mix.anderson_mix(a[1], a[2], alpha, a[4], a[0], best_a, slot, n, beta, True)
            A.anderson_mix_ref(b[1], b[2], want_alpha, b[4], b[0], best_b, slot, n, beta, True)
            _close(a[0], b[0], 1e-5, "mix x")
            _close(best_a, best_b, 1e-5, "mix best")
