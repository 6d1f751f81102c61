"""Heatmap head ops (ldeq_fast.ops.heatmap): every backend against layers.py's softargmax_normalize
and heatmaps_to_keypoints, values and gradients (to h, a tensor beta, and heatmaps)."""
import os

import pytest
import torch

from ldeq_fast.model.layers import heatmaps_to_keypoints, softargmax_normalize
from ldeq_fast.ops import heatmap as hmo
from ldeq_fast.ops import triton_available

needs_cpp = pytest.mark.skipif("cpp" not in hmo.SUPPORTS,
                               reason="ldeq_fast._C is not built (or predates the heatmap kernels)")

SHAPES = [(1, 1, 1, 1), (1, 1, 3, 3), (3, 7, 17, 17), (2, 4, 6, 9), (1, 3, 64, 64), (2, 2, 5, 130)]
NAMES = ("heatmaps", "keypoints", "spread", "published")


def _inputs(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0).to(device=device, dtype=dtype)
    beta = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(device)
             for s in (shape, (shape[0], shape[1], 2), shape[:2], shape[:2])]
    return h, beta, grads


def _head(fn, h, beta, grads, **kw):
    """Outputs and (dh, dbeta) of sum(out_i * grad_i).  1x1 maps have zero spread, where sqrt has no
    derivative: their spread/published gradients are left out."""
    h = h.detach().clone().requires_grad_()
    beta = beta.detach().clone().requires_grad_() if isinstance(beta, torch.Tensor) else beta
    outs = fn(h, beta, **kw)
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


@pytest.fixture
def nan_empty():
    """Uninitialised tensors (also at::empty inside the C++ kernels) come back NaN-filled, so any output
    element a kernel forgets to write fails the comparison."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(prev)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("beta_kind", ["float", "vector", "nchw"])
def test_cpp_head_matches_reference(shape, dtype, beta_kind, nan_empty):
    h, beta, grads = _inputs(shape, dtype)
    beta = {"float": 1.7, "vector": beta, "nchw": beta.view(1, -1, 1, 1)}[beta_kind]
    got = _head(hmo.heatmap_head, h, beta, grads, backend="cpp")
    want = _head(hmo.heatmap_head_ref, h, beta, grads)
    _compare(got, want, 1e-5)  # the reference reads out in float32 even for float64 maps
    assert got[0][0].dtype == dtype
    with torch.no_grad():  # direct kernel call, no custom-op / autograd layers
        for a, e in zip(hmo.heatmap_head(h, beta, backend="cpp"), got[0]):
            assert torch.equal(a, e)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_separate_ops_match_reference(shape, nan_empty):
    h, beta, grads = _inputs(shape, torch.float32)
    hr = h.clone().requires_grad_()
    br = beta.clone().requires_grad_()
    hm = hmo.softargmax_heatmaps(hr, br, backend="cpp")
    (hm.double() * grads[0]).sum().backward()
    hw = h.clone().requires_grad_()
    bw = beta.clone().requires_grad_()
    (softargmax_normalize(hw, bw.view(1, -1, 1, 1)).double() * grads[0]).sum().backward()
    _assert_close(hm, softargmax_normalize(h, beta.view(1, -1, 1, 1)), 1e-6, "heatmaps")
    assert torch.equal(hmo.softargmax_heatmaps(h, beta, backend="cpp"), hm.detach())
    _assert_close(hr.grad, hw.grad, 1e-5, "dh")
    _assert_close(br.grad, bw.grad, 1e-5, "dbeta")
    # keypoints of arbitrary positive maps (not peak-normalised), gradients w.r.t. the maps
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 3.0
    used = 3 if shape[2] * shape[3] > 1 else 1
    outs = []
    for fn in (lambda m: hmo.heatmap_keypoints(m, backend="cpp"), heatmaps_to_keypoints):
        m = maps.clone().requires_grad_()
        res = fn(m)
        sum((r.double() * g).sum() for r, g in zip(res[:used], grads[1:1 + used])).backward()
        outs.append((res, m.grad))
    for a, e, name in zip(outs[0][0], outs[1][0], NAMES[1:]):
        _assert_close(a, e, 1e-5, name)
    _assert_close(outs[0][1], outs[1][1], 1e-5, "dmaps")
    for a, e in zip(hmo.heatmap_keypoints(maps, backend="cpp"), outs[0][0]):
        assert torch.equal(a, e.detach())


@needs_cpp
def test_cpp_softargmax_splits_gradient_among_tied_maxima():
    h = torch.randint(0, 3, (2, 3, 5, 4)).double()  # several positions share each map's max
    beta = torch.tensor([0.7, 1.0, 2.0], dtype=torch.float64)
    g = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    a = h.clone().requires_grad_()
    (hmo.softargmax_heatmaps(a, beta, backend="cpp") * g).sum().backward()
    b = h.clone().requires_grad_()
    (softargmax_normalize(b, beta.view(1, -1, 1, 1)) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@needs_cpp
def test_cpp_gradcheck_fp64():
    h, beta, _ = _inputs((2, 3, 4, 5), torch.float64)
    h.requires_grad_()
    beta.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, b: hmo.heatmap_head(h, b, backend="cpp"), (h, beta))
    assert torch.autograd.gradcheck(lambda h, b: hmo.softargmax_heatmaps(h, b, backend="cpp"), (h, beta))
    maps = (torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: hmo.heatmap_keypoints(m, backend="cpp"), (maps,))


@needs_cpp
def test_cpp_zero_spread_with_unused_spread_gradient_is_finite():
    h = torch.full((1, 2, 1, 1), 0.3).requires_grad_()  # 1x1 maps: spread 0
    hm, kpts, spread, published = hmo.heatmap_head(h, 1.0, backend="cpp")
    assert spread.eq(0).all()
    (hm.sum() + kpts.sum()).backward()
    assert torch.isfinite(h.grad).all()


def test_keypoints_of_half_maps_are_float32():
    maps = torch.rand(1, 2, 5, 5).to(torch.bfloat16)
    for got, want in zip(hmo.heatmap_keypoints(maps), heatmaps_to_keypoints(maps)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


def test_torch_backend_is_the_reference():
    h, beta, _ = _inputs((2, 3, 6, 6), torch.float32)
    for got, want in zip(hmo.heatmap_head(h, beta, backend="torch"), hmo.heatmap_head_ref(h, beta)):
        assert torch.equal(got, want)


# Triton reads TRITON_INTERPRET when triton itself is imported: on CPU the Triton tests below run in the
# TRITON_INTERPRET=1 child pytest started by test_leaky_relu_group_norm.py::test_cellops_triton_in_interpreter;
# with a GPU they run in-process on CUDA tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


@pytest.fixture
def triton_kernels():
    if not triton_available():
        pytest.skip("triton is not installed")
    if TRITON_DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child process started by "
                    "test_leaky_relu_group_norm.py::test_cellops_triton_in_interpreter, or on a GPU")
    return hmo.load_triton_kernels("heatmap")


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 3, 3), (2, 3, 6, 9), (1, 1, 70, 70)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_triton_matches_reference(shape, dtype, triton_kernels, nan_empty):
    h, beta, grads = _inputs(shape, dtype, device=TRITON_DEVICE)
    got = _head(hmo.heatmap_head, h, beta, grads, backend="triton")
    want = _head(hmo.heatmap_head_ref, h, beta, grads)
    _compare(got, want, 1e-5)
    with torch.no_grad():
        for a, e in zip(hmo.heatmap_head(h, beta, backend="triton"), got[0]):
            assert torch.equal(a, e)
    # the separate ops, with tied maxima
    ht = torch.randint(0, 3, shape).to(device=TRITON_DEVICE, dtype=dtype)
    a = ht.clone().requires_grad_()
    (hmo.softargmax_heatmaps(a, beta, backend="triton").double() * grads[0]).sum().backward()
    b = ht.clone().requires_grad_()
    (softargmax_normalize(b, beta.view(1, -1, 1, 1)).double() * grads[0]).sum().backward()
    _assert_close(a.grad, b.grad, 1e-5, "dh (ties)")
    maps = torch.rand(shape, dtype=dtype, device=TRITON_DEVICE) + 0.1
    used = 3 if shape[2] * shape[3] > 1 else 1
    res = []
    for fn in (lambda m: hmo.heatmap_keypoints(m, backend="triton"), heatmaps_to_keypoints):
        m = maps.clone().requires_grad_()
        out = fn(m)
        sum((r.double() * g).sum() for r, g in zip(out[:used], grads[1:1 + used])).backward()
        res.append((out, m.grad))
    for x, y, name in zip(res[0][0], res[1][0], NAMES[1:]):
        _assert_close(x, y, 1e-5, name)
    _assert_close(res[0][1], res[1][1], 1e-5, "dmaps")


def test_triton_kernels_write_every_element(triton_kernels, nan_empty):
    h, beta, grads = _inputs((2, 3, 5, 7), torch.float32, device=TRITON_DEVICE)
    hm, hmax = triton_kernels.softargmax_heatmaps(h, beta)
    kpts, spread, published, mass = triton_kernels.heatmap_keypoints(hm)
    dh, dbeta = triton_kernels.softargmax_heatmaps_backward(grads[0].float(), h, beta, hm, hmax)
    dhm = triton_kernels.heatmap_keypoints_backward(grads[1].float(), grads[2].float(), grads[3].float(), hm, kpts,
                                                    spread, published, mass)
    for t in (hm, hmax, kpts, spread, published, mass, dh, dbeta, dhm):
        assert torch.isfinite(t).all()


def test_opcheck_triton(triton_kernels):
    # the registration (fake, autograd) is shared with the cpp backend and fully checked there; here the
    # Triton kernels are checked for schema conformance (no mutation/aliasing) and fake-tensor agreement
    utils = ("test_schema", "test_faketensor")
    h, beta, grads = _inputs((1, 2, 3, 4), torch.float32, device=TRITON_DEVICE)
    torch.library.opcheck(hmo._head_op, (h.clone().requires_grad_(), beta.clone().requires_grad_(), "triton"),
                          test_utils=utils)
    hm, hmax = triton_kernels.softargmax_heatmaps(h, beta)
    kpts, spread, published, mass = triton_kernels.heatmap_keypoints(hm)
    g = [t.float() for t in grads]
    torch.library.opcheck(hmo._head_backward_op, (g[0], h, beta, hm, hmax, g[1], g[2], g[3], kpts, spread, published,
                                                  mass, "triton"), test_utils=utils)


@needs_cpp
def test_opcheck_cpp():
    h, beta, grads = _inputs((2, 3, 4, 5), torch.float32)
    hr, br = h.clone().requires_grad_(), beta.clone().requires_grad_()
    torch.library.opcheck(hmo._head_op, (hr, br, "cpp"))
    torch.library.opcheck(hmo._softargmax_op, (hr, br, "cpp"))
    torch.library.opcheck(hmo._keypoints_op, (torch.rand(2, 3, 4, 5, requires_grad=True), "cpp"))
    hm, kpts, spread, published, hmax, mass = torch.ops.ldeq_fast.heatmap_head_cpu(h, beta)
    g = [t.float() for t in grads]
    torch.library.opcheck(hmo._head_backward_op, (g[0], h, beta, hm, hmax, g[1], g[2], g[3], kpts, spread, published,
                                                  mass, "cpp"))
    torch.library.opcheck(hmo._keypoints_backward_op, (g[1], g[2], g[3], hm, kpts, spread, published, mass, "cpp"))
    torch.library.opcheck(torch.ops.ldeq_fast.heatmap_head_cpu.default, (h, beta))
    torch.library.opcheck(torch.ops.ldeq_fast.heatmap_head_backward_cpu.default,
                          (g[0], h, beta, hm, hmax, None, None, None, None, None, None, None))


@needs_cpp
def test_torch_compile_cpu():
    h, beta, _ = _inputs((2, 3, 6, 6), torch.float32)

    def f(h, beta):
        hm, kpts, spread, published = hmo.heatmap_head(h, beta, backend="cpp")
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
        hmo.heatmap_head(h[0], 1.0, backend=backend)
    with pytest.raises(TypeError, match="float32 or float64"):
        hmo.heatmap_head(h.to(torch.int64), 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"beta must be a scalar, \(K,\) or \(1, K, 1, 1\) with K=3"):
        hmo.heatmap_head(h, torch.ones(4), backend=backend)
    with pytest.raises(TypeError, match="beta must be a float or a tensor"):
        hmo.softargmax_heatmaps(h, True, backend=backend)
    with pytest.raises(ValueError, match="H, W >= 1"):
        hmo.heatmap_keypoints(torch.rand(2, 3, 0, 4), backend=backend)
    with pytest.raises(TypeError, match="beta must be floating point"):
        hmo.heatmap_head(h, torch.ones(3, dtype=torch.int64), backend=backend)
