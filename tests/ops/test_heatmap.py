"""The heatmap ops (ldeq_fast.ops.heatmap): softargmax_heatmaps and heatmap_keypoints on every backend against
their references, values and gradients (to h, a tensor beta, and heatmaps); the ops' registrations."""

import pytest
import torch
from conftest import INTERPRETED, TRITON_DEVICE, close_rel, needs_cpp

from ldeq_fast.ops import heatmap as hmo
from ldeq_fast.ops import load_triton_kernels, triton_available

SHAPES = [(1, 1, 1, 1), (1, 1, 3, 3), (3, 7, 17, 17), (2, 4, 6, 9), (1, 3, 64, 64), (2, 2, 5, 130)]
NAMES = ("heatmaps", "keypoints", "spread", "published")


def _inputs(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0).to(device=device, dtype=dtype)
    beta = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(device)
             for s in (shape, (shape[0], shape[1], 2), shape[:2], shape[:2])]
    return h, beta, grads


def _head(backend):
    """The model's use of the two ops: heatmaps from cell features, then their keypoints."""
    def head(h, beta):
        hm = hmo.softargmax_heatmaps(h, beta, backend=backend)
        return (hm, *hmo.heatmap_keypoints(hm, backend=backend))

    return head


def _head_ref(h, beta):
    hm = hmo.softargmax_heatmaps_ref(h, beta)
    return (hm, *hmo.heatmap_keypoints_ref(hm))


def _grads_of(fn, h, beta, grads):
    """Outputs and (dh, dbeta) of sum(out_i * grad_i).  1x1 maps have zero spread, where sqrt has no
    derivative: their spread/published gradients are left out."""
    h = h.detach().clone().requires_grad_()
    beta = beta.detach().clone().requires_grad_() if isinstance(beta, torch.Tensor) else beta
    outs = fn(h, beta)
    used = outs if h.shape[2] * h.shape[3] > 1 else outs[:2]
    loss = sum((o.double() * g).sum() for o, g in zip(used, grads))
    loss.backward()
    return [o.detach() for o in outs], h.grad, (beta.grad if isinstance(beta, torch.Tensor) else None)


def _assert_close(actual, expected, tol, what):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def _compare(got, want, tol):
    for a, e, name in zip(got[0], want[0], NAMES):
        assert a.shape == e.shape, name
        _assert_close(a, e, tol, name)
    _assert_close(got[1], want[1], tol, "dh")
    if want[2] is not None:
        _assert_close(got[2], want[2], tol, "dbeta")


def _keypoints_and_grad(fn, maps, grads):
    """Keypoint outputs of arbitrary positive maps and the gradient w.r.t. the maps."""
    used = 3 if maps.shape[2] * maps.shape[3] > 1 else 1
    m = maps.clone().requires_grad_()
    res = fn(m)
    sum((r.double() * g).sum() for r, g in zip(res[:used], grads[1:1 + used])).backward()
    return [r.detach() for r in res], m.grad


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("beta_kind", ["float", "vector", "nchw"])
def test_cpp_matches_reference(shape, dtype, beta_kind, nan_empty):
    h, beta, grads = _inputs(shape, dtype)
    beta = {"float": 1.7, "vector": beta, "nchw": beta.view(1, -1, 1, 1)}[beta_kind]
    got = _grads_of(_head("cpp"), h, beta, grads)
    want = _grads_of(_head_ref, h.double(), beta.double() if isinstance(beta, torch.Tensor) else beta, grads)
    _compare(got, want, 1e-5 if dtype == torch.float32 else 1e-10)
    assert all(o.dtype == dtype for o in got[0])
    with torch.no_grad():  # without a graph: the same kernels
        for a, e in zip(_head("cpp")(h, beta), got[0]):
            assert torch.equal(a, e)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_keypoints_of_unnormalised_maps(shape, nan_empty):
    _, _, grads = _inputs(shape, torch.float32)
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 3.0
    got = _keypoints_and_grad(lambda m: hmo.heatmap_keypoints(m, backend="cpp"), maps, grads)
    want = _keypoints_and_grad(hmo.heatmap_keypoints_ref, maps.double(), grads)
    for a, e, name in zip(got[0], want[0], NAMES[1:]):
        _assert_close(a, e, 1e-5, name)
    _assert_close(got[1], want[1], 1e-5, "dmaps")


@needs_cpp
def test_cpp_softargmax_splits_gradient_among_tied_maxima():
    h = torch.randint(0, 3, (2, 3, 5, 4)).double()  # several positions share each map's max
    beta = torch.tensor([0.7, 1.0, 2.0], dtype=torch.float64)
    g = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    a = h.clone().requires_grad_()
    (hmo.softargmax_heatmaps(a, beta, backend="cpp") * g).sum().backward()
    b = h.clone().requires_grad_()
    (hmo.softargmax_heatmaps_ref(b, beta) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@needs_cpp
def test_cpp_gradcheck_fp64():
    h, beta, _ = _inputs((2, 3, 4, 5), torch.float64)
    h.requires_grad_()
    beta.requires_grad_()
    assert torch.autograd.gradcheck(_head("cpp"), (h, beta))
    assert torch.autograd.gradcheck(lambda h, b: hmo.softargmax_heatmaps(h, b, backend="cpp"), (h, beta))
    maps = (torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: hmo.heatmap_keypoints(m, backend="cpp"), (maps,))


@needs_cpp
def test_cpp_zero_spread_with_unused_spread_gradient_is_finite():
    h = torch.full((1, 2, 1, 1), 0.3).requires_grad_()  # 1x1 maps: spread 0
    hm, kpts, spread, published = _head("cpp")(h, 1.0)
    assert spread.eq(0).all()
    (hm.sum() + kpts.sum()).backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_half_maps_are_computed_in_float32(backend):
    maps = torch.rand(1, 2, 5, 5).to(torch.bfloat16)
    for got, want in zip(hmo.heatmap_keypoints(maps, backend=backend), hmo.heatmap_keypoints_ref(maps.float())):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
    hm = hmo.softargmax_heatmaps(maps, 1.5, backend=backend)
    assert hm.dtype == torch.float32
    torch.testing.assert_close(hm, hmo.softargmax_heatmaps_ref(maps.float(), 1.5))


def test_torch_backend_is_the_reference():
    h, beta, _ = _inputs((2, 3, 6, 6), torch.float32)
    for got, want in zip(_head("torch")(h, beta), _head_ref(h, beta)):
        assert torch.equal(got, want)




@pytest.fixture
def triton_kernels():
    if not triton_available():
        pytest.skip("triton is not installed")
    if TRITON_DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py) or on a GPU")
    return load_triton_kernels("heatmap")


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 6, 9)], ids=lambda s: "x".join(map(str, s)))
def test_triton_ops_autograd(shape, triton_kernels, nan_empty):
    """The public ops on backend 'triton' with a graph: values and gradients (to h, a tensor beta, the maps)
    through the ops' autograd (on CPU tensors: the interpreter path's, the same backward as on CUDA)."""
    h, beta, grads = _inputs(shape, torch.float32, device=TRITON_DEVICE)
    got = _grads_of(_head("triton"), h, beta, grads)
    want = _grads_of(_head_ref, h.double(), beta.double(), grads)
    _compare(got, want, 1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 3, 3), (2, 3, 6, 9), (1, 1, 70, 70)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_triton_matches_reference(shape, dtype, triton_kernels, nan_empty):
    h, beta, grads = _inputs(shape, dtype, device=TRITON_DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    hm, hmax = triton_kernels.softargmax_heatmaps(h, beta)
    _assert_close(hm, hmo.softargmax_heatmaps_ref(h.double(), beta.double()), tol, "heatmaps")
    hr, br = h.double().requires_grad_(), beta.double().requires_grad_()
    (hmo.softargmax_heatmaps_ref(hr, br) * grads[0]).sum().backward()
    dh, dbeta = triton_kernels.softargmax_heatmaps_backward(grads[0].to(dtype), h, beta, hm, hmax)
    _assert_close(dh, hr.grad, tol, "dh")
    _assert_close(dbeta, br.grad, tol, "dbeta")
    maps = torch.rand(shape, dtype=dtype, device=TRITON_DEVICE) + 0.1
    want, want_grad = _keypoints_and_grad(hmo.heatmap_keypoints_ref, maps.double(), grads)
    kpts, spread, published, mass = triton_kernels.heatmap_keypoints(maps)
    for a, e, name in zip((kpts, spread, published), want, NAMES[1:]):
        _assert_close(a, e, tol, name)
    used = 3 if shape[2] * shape[3] > 1 else 1
    g = [grads[1 + i].to(dtype) if i < used else torch.zeros_like(t) for i, t in enumerate((kpts, spread, published))]
    dmaps = triton_kernels.heatmap_keypoints_backward(*g, maps, kpts, spread, published, mass)
    _assert_close(dmaps, want_grad, tol, "dmaps")
    with torch.no_grad():  # the public functions run the same kernels
        assert torch.equal(hmo.softargmax_heatmaps(h, beta, backend="triton"), hm)
        assert torch.equal(hmo.heatmap_keypoints(maps, backend="triton")[0], kpts)
    if TRITON_DEVICE == "cuda":  # the ops' CUDA kernels, with autograd
        _compare(_grads_of(_head("triton"), h, beta, grads), _grads_of(_head_ref, h.double(), beta.double(), grads),
                 tol)


def test_triton_softargmax_ties(triton_kernels):
    h = torch.randint(0, 3, (2, 3, 5, 4)).to(TRITON_DEVICE, torch.float64)
    beta = torch.tensor([0.7, 1.0, 2.0], dtype=torch.float64, device=TRITON_DEVICE)
    g = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=TRITON_DEVICE)
    hm, hmax = triton_kernels.softargmax_heatmaps(h, beta)
    dh, _ = triton_kernels.softargmax_heatmaps_backward(g, h, beta, hm, hmax)
    b = h.clone().requires_grad_()
    (hmo.softargmax_heatmaps_ref(b, beta) * g).sum().backward()
    torch.testing.assert_close(dh, b.grad)


def test_triton_kernels_write_every_element(triton_kernels, nan_empty):
    h, beta, grads = _inputs((2, 3, 5, 7), torch.float32, device=TRITON_DEVICE)
    hm, hmax = triton_kernels.softargmax_heatmaps(h, beta)
    kpts, spread, published, mass = triton_kernels.heatmap_keypoints(hm)
    dh, dbeta = triton_kernels.softargmax_heatmaps_backward(grads[0].float(), h, beta, hm, hmax)
    dhm = triton_kernels.heatmap_keypoints_backward(grads[1].float(), grads[2].float(), grads[3].float(), hm, kpts,
                                                    spread, published, mass)
    for t in (hm, hmax, kpts, spread, published, mass, dh, dbeta, dhm):
        assert torch.isfinite(t).all()


def _opcheck_all(device):
    h, beta, grads = _inputs((2, 3, 4, 5), torch.float32, device=device)
    torch.library.opcheck(hmo.SOFTARGMAX, (h.clone().requires_grad_(), beta.clone().requires_grad_()))
    hm, hmax = hmo.SOFTARGMAX(h, beta)
    torch.library.opcheck(hmo.SOFTARGMAX_BACKWARD, (grads[0].float(), h, beta, hm, hmax))
    maps = (torch.rand(2, 3, 4, 5, device=device) + 0.1).requires_grad_()
    torch.library.opcheck(hmo.KEYPOINTS, (maps,))
    kpts, spread, published, mass = hmo.KEYPOINTS(maps.detach())
    g = [t.float() for t in grads[1:]]
    torch.library.opcheck(hmo.KEYPOINTS_BACKWARD, (*g, maps.detach(), kpts, spread, published, mass))


@needs_cpp
def test_opcheck_cpu():
    """The ops with their CPU (C++) kernels: schema, fake impls, autograd registration."""
    _opcheck_all("cpu")


@pytest.mark.gpu
def test_opcheck_cuda():
    """The ops with their CUDA (Triton) kernels."""
    _opcheck_all("cuda")


@needs_cpp
def test_torch_compile_cpu():
    h, beta, _ = _inputs((2, 3, 6, 6), torch.float32)

    def f(h, beta):
        hm, kpts, spread, published = _head("cpp")(h, beta)
        return hm.mean() + kpts.sum() + spread.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = [h.clone().requires_grad_(), beta.clone().requires_grad_()]
    e = [h.clone().requires_grad_(), beta.clone().requires_grad_()]
    compiled(*a).backward()
    f(*e).backward()
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_bad_inputs_raise_clear_errors(backend):
    h = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="must be 4-D"):
        hmo.softargmax_heatmaps(h[0], 1.0, backend=backend)
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        hmo.softargmax_heatmaps(h.to(torch.int64), 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"beta must be a scalar, \(K,\) or \(1, K, 1, 1\) with K=3"):
        hmo.softargmax_heatmaps(h, torch.ones(4), backend=backend)
    with pytest.raises(TypeError, match="beta must be a float or a tensor"):
        hmo.softargmax_heatmaps(h, True, backend=backend)
    with pytest.raises(ValueError, match="H, W >= 1"):
        hmo.heatmap_keypoints(torch.rand(2, 3, 0, 4), backend=backend)
    with pytest.raises(TypeError, match="beta must be floating point"):
        hmo.softargmax_heatmaps(h, torch.ones(3, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match="must be 4-D"):
        hmo.heatmap_keypoints(h[0], backend=backend)

# --------------------------------------------------------------------------------------------------------
# the Triton launchers called directly (no dispatch), odd and minimal shapes, outputs NaN-filled
# --------------------------------------------------------------------------------------------------------
# heatmaps

HEATMAP_SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (2, 3, 17, 23), (1, 2, 33, 40), (1, 1, 2, 1100)]


@pytest.mark.parametrize("shape", HEATMAP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_heatmap_launchers_match_reference(shape, dtype, triton_loader):
    k = triton_loader("heatmap")
    g = torch.Generator().manual_seed(sum(shape))
    B, K, H, W = shape
    h = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(TRITON_DEVICE)
    h[0, 0].view(-1)[: min(2, H * W)] = h[0, 0].max()               # a tie at the max
    beta = (0.5 + torch.rand(K, generator=g, dtype=torch.float64)).to(TRITON_DEVICE)
    g_hm, g_k, g_s, g_p = (torch.randn(s, generator=g, dtype=torch.float64).to(TRITON_DEVICE)
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
    close_rel(hm, want_hm, tol, "softargmax hm")
    close_rel(hmax, h.amax(dim=(2, 3)), tol, "softargmax hmax")
    kpts, spread, published, mass = k.heatmap_keypoints(want_hm.to(dtype))
    ref = hmo.heatmap_keypoints_ref(want_hm)
    for got, want, what in zip((kpts, spread, published), ref, ("keypoints", "spread", "published")):
        close_rel(got, want, 1e-5, what)  # the reference reads out in float32
    close_rel(mass, want_hm.sum(dim=(2, 3)), tol, "mass")

    # backward against autograd through the float64 references
    hr, br = h.clone().requires_grad_(), beta.clone().requires_grad_()
    (hmo.softargmax_heatmaps_ref(hr, br) * g_hm).sum().backward()
    dh, dbeta = k.softargmax_heatmaps_backward(g_hm.to(dtype), h.to(dtype), beta.to(dtype), hm, hmax)
    close_rel(dh, hr.grad, tol, "softargmax dh")
    close_rel(dbeta, br.grad, tol, "softargmax dbeta")
    mr = want_hm.clone().requires_grad_()
    out = hmo.heatmap_keypoints_ref(mr.double())
    (sum((o.double() * w).sum() for o, w in zip(out[:n_out], (g_k, g_s, g_p)))).backward()
    dhm = k.heatmap_keypoints_backward(g_k.to(dtype), g_s.to(dtype), g_p.to(dtype), want_hm.to(dtype), kpts, spread,
                                       published, mass)
    close_rel(dhm, mr.grad, 1e-4, "keypoints dhm")


