"""Fused LeakyReLU -> GroupNorm (ldeq_fast.ops.leaky_relu_group_norm): every backend against the float64 eager
composition, values and gradients, both memory formats, odd shapes and group counts."""

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRETED, TRITON_DEVICE, close_rel, needs_cpp

from ldeq_fast.ops import leaky_relu_group_norm as gn
from ldeq_fast.ops import load_triton_kernels, triton_available

# (N, C, H, W, groups): minimal (F.group_norm refuses N * H * W == 1), odd, G = 1 / 2 / C, and sizes that split one group / one row / one
# channels_last image over several parallel tasks.
SHAPES = [
    (2, 1, 1, 1, 1), (2, 3, 1, 1, 3), (1, 7, 3, 3, 1), (1, 7, 3, 3, 7), (3, 6, 17, 17, 2), (3, 6, 17, 17, 6),
    (2, 4, 5, 3, 4), (1, 1, 17, 17, 1), (2, 224, 4, 4, 1), (1, 32, 37, 29, 1), (1, 2, 131, 131, 2),
]


def _inputs(shape, dtype, channels_last, seed=0):
    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, generator=g, dtype=torch.float64).to(dtype if dtype != torch.bfloat16 else torch.float32)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(w.dtype)
    grad = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    return x, w, b, G, grad


def _on(device, *items):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in items]


def _run(fn, x, w, b, G, grad, **kw):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b, G, **kw)
    out.backward(grad.to(out.dtype))
    return out, x.grad, w.grad, b.grad


def _truth(x, w, b, G, grad):
    """float64 eager reference on the same (rounded) inputs."""
    return _run(gn.leaky_relu_group_norm_ref, x.double(), w.double(), b.double(), G, grad)


def _assert_close(actual, expected, tol, what, scale=1.0):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = max(scale, expected.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def _dx_scale(x, w, G, grad, eps=1e-5):
    """Size of the terms that cancel in dx = rstd * (g*w - mean(g*w) - yhat * mean(g*w*yhat)): rounding
    errors scale with it (a one-element group has rstd = 1/sqrt(eps) ~ 316 and dx = 0 exactly)."""
    y = F.leaky_relu(x.double(), 0.01).reshape(x.shape[0], G, -1)
    rstd = (y.var(-1, unbiased=False) + eps).rsqrt().max().item()
    return max(1.0, rstd * w.double().abs().max().item() * grad.abs().max().item())


def _check_all(got, want, tol, x, w, G, grad):
    for a, e, name in zip(got, want, ("out", "dx", "dweight", "dbias")):
        _assert_close(a, e, tol, name, _dx_scale(x, w, G, grad) if name == "dx" else 1.0)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cpp_matches_reference(shape, channels_last, dtype, nan_empty):
    x, w, b, G, grad = _inputs(shape, dtype, channels_last)
    got = _run(gn.leaky_relu_group_norm, x, w, b, G, grad, backend="cpp")
    want = _truth(x, w, b, G, grad)
    _check_all(got, want, 1e-5 if dtype == torch.float32 else 1e-10, x, w, G, grad)
    out, dx = got[0], got[1]
    with torch.no_grad():  # without a graph: the same kernel
        assert torch.equal(gn.leaky_relu_group_norm(x, w, b, G, backend="cpp"), out)
    assert out.dtype == dtype and dx.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_cpp_half_inputs_fp32_stats(dtype, channels_last, nan_empty):
    x, w, b, G, grad = _inputs((2, 6, 9, 7, 3), dtype, channels_last)
    got = _run(gn.leaky_relu_group_norm, x, w, b, G, grad, backend="cpp")
    want = _truth(x, w, b, G, grad)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == w.dtype
    _check_all(got, want, 2e-2, x, w, G, grad)  # output rounding of an 8/11-bit mantissa; statistics are fp32


@needs_cpp
def test_cpp_result_independent_of_thread_count():
    x, w, b, G, grad = _inputs((1, 32, 37, 29, 1), torch.float32, False)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(gn.leaky_relu_group_norm, x, w, b, G, grad, backend="cpp")
        torch.set_num_threads(2)
        two = _run(gn.leaky_relu_group_norm, x, w, b, G, grad, backend="cpp")
    finally:
        torch.set_num_threads(prev)
    for a, c in zip(one, two):
        assert torch.equal(a, c)


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_cpp_gradcheck_fp64(channels_last):
    x, w, b, G, _ = _inputs((2, 4, 3, 3, 2), torch.float64, channels_last)
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: gn.leaky_relu_group_norm(x, w, b, G, backend="cpp"), (x, w, b))


@needs_cpp
def test_optional_affine_and_strided_input():
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64)[:, :, :, ::2]  # neither contiguous nor channels_last
    out = gn.leaky_relu_group_norm(x, None, None, 4, eps=1e-3, slope=0.2, backend="cpp")
    torch.testing.assert_close(out, gn.leaky_relu_group_norm_ref(x, None, None, 4, eps=1e-3, slope=0.2))


def _check_residual(backend, device, dtype, channels_last, residual_layout_differs):
    """out = group_norm(leaky_relu(x)) + residual in one op: values, and gradients of x, weight, bias and
    the residual (its gradient is the output's) against the float64 eager composition (the Triton
    interpreter path on CPU tensors too: it has the CUDA path's autograd)."""
    x, w, b, G, grad = _on(device, *_inputs((2, 6, 9, 7, 3), dtype, channels_last))
    res = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device, dtype)
    if channels_last != residual_layout_differs:
        res = res.to(memory_format=torch.channels_last)

    def run(fn, x, w, b, res):
        x, w, b, res = (t.detach().clone().requires_grad_() for t in (x, w, b, res))
        out = fn(x, w, b, G, residual=res)
        out.backward(grad.to(out.dtype))
        return out, x.grad, w.grad, b.grad, res.grad

    got = run(lambda *a, **k: gn.leaky_relu_group_norm(*a, **k, backend=backend), x, w, b, res)
    want = run(gn.leaky_relu_group_norm_ref, x.double(), w.double(), b.double(), res.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    _check_all(got[:4], want[:4], tol, x, w, G, grad)
    assert torch.equal(got[4], grad.to(dtype))
    assert got[0].stride() == x.stride()
    with torch.no_grad():
        direct = gn.leaky_relu_group_norm(x, w, b, G, residual=res, backend=backend)
        assert torch.equal(direct, got[0])


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual_layout_differs", [False, True], ids=["same", "other-layout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cpp_residual(dtype, channels_last, residual_layout_differs, nan_empty):
    _check_residual("cpp", "cpu", dtype, channels_last, residual_layout_differs)


@needs_cpp
def test_cpp_gradcheck_residual_fp64():
    x, w, b, G, _ = _inputs((2, 4, 3, 3, 2), torch.float64, True)
    res = torch.randn_like(x)
    args = tuple(t.clone().requires_grad_() for t in (x, w, b, res))
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: gn.leaky_relu_group_norm(x, w, b, G, residual=r, backend="cpp"), args)


def test_torch_backend_is_the_reference():
    x, w, b, G, _ = _inputs((2, 6, 5, 5, 3), torch.float32, False)
    assert torch.equal(gn.leaky_relu_group_norm(x, w, b, G, backend="torch"), F.group_norm(F.leaky_relu(x, 0.01), G, w, b))




@pytest.fixture
def triton_kernels():
    if not triton_available():
        pytest.skip("triton is not installed")
    if TRITON_DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py) or on a GPU")
    return load_triton_kernels("leaky_relu_group_norm")


@pytest.mark.parametrize("shape", [(2, 1, 1, 1, 1), (1, 7, 3, 3, 7), (2, 6, 5, 3, 2), (1, 5, 17, 17, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_triton_matches_reference(shape, channels_last, dtype, triton_kernels, nan_empty):
    x, w, b, G, grad = _on(TRITON_DEVICE, *_inputs(shape, dtype, channels_last))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    want = _truth(x, w, b, G, grad)
    # kernels writing into NaN-filled buffers: every element must be written
    out = torch.full_like(x, float("nan"))
    out, mean, rstd = triton_kernels.leaky_relu_group_norm(x, w, b, G, 1e-5, 0.01, out=out)
    dx = torch.full_like(x, float("nan"))
    dx, dw, db = triton_kernels.leaky_relu_group_norm_backward(grad.to(dtype), x, w, mean, rstd, G, 0.01, dx=dx)
    _check_all((out, dx, dw, db), want, tol, x, w, G, grad)
    with torch.no_grad():  # the public function runs the same kernel
        assert torch.equal(gn.leaky_relu_group_norm(x, w, b, G, backend="triton"), out)
    if TRITON_DEVICE == "cuda":  # the op's CUDA kernel, with autograd
        _check_all(_run(gn.leaky_relu_group_norm, x, w, b, G, grad, backend="triton"), want, tol, x, w, G, grad)


def test_triton_bf16(triton_kernels):
    x, w, b, G, grad = _on(TRITON_DEVICE, *_inputs((2, 4, 5, 5, 2), torch.bfloat16, True))
    out, mean, rstd = triton_kernels.leaky_relu_group_norm(x, w, b, G, 1e-5, 0.01)
    dx, dw, db = triton_kernels.leaky_relu_group_norm_backward(grad.to(x.dtype), x, w, mean, rstd, G, 0.01)
    assert out.dtype == torch.bfloat16 and mean.dtype == torch.float32
    _check_all((out, dx, dw, db), _truth(x, w, b, G, grad), 2e-2, x, w, G, grad)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual_layout_differs", [False, True], ids=["same", "other-layout"])
def test_triton_residual(channels_last, residual_layout_differs, triton_kernels, nan_empty):
    _check_residual("triton", TRITON_DEVICE, torch.float32, channels_last, residual_layout_differs)


@pytest.mark.gpu
def test_opcheck_cuda(triton_kernels):
    """The ops with their CUDA (Triton) kernels: schema, fake impl, autograd registration."""
    x, w, b, G, grad = _on("cuda", *_inputs((1, 4, 3, 3, 2), torch.float32, True))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    torch.library.opcheck(gn.FORWARD, (xr, wr, br, G, 1e-5, 0.01, None))
    torch.library.opcheck(gn.FORWARD, (xr, wr, br, G, 1e-5, 0.01, torch.randn_like(x).requires_grad_()))
    _, mean, rstd = gn.FORWARD(x, w, b, G, 1e-5, 0.01)
    torch.library.opcheck(gn.BACKWARD, (grad.float(), x, w, mean, rstd, G, 0.01))


@needs_cpp
def test_opcheck_cpu():
    """The ops with their CPU (C++) kernels: schema, fake impl, autograd registration, both layouts."""
    x, w, b, G, grad = _inputs((2, 4, 3, 5, 2), torch.float32, False)
    for xx in (x, x.to(memory_format=torch.channels_last)):
        xr, wr, br = (t.clone().requires_grad_() for t in (xx, w, b))
        torch.library.opcheck(gn.FORWARD, (xr, wr, br, G, 1e-5, 0.01, None))
        torch.library.opcheck(gn.FORWARD, (xr, wr, br, G, 1e-5, 0.01, torch.randn_like(xx).requires_grad_()))
    _, mean, rstd = gn.FORWARD(x, w, b, G, 1e-5, 0.01)
    torch.library.opcheck(gn.BACKWARD, (grad.float(), x, w, mean, rstd, G, 0.01))


@needs_cpp
def test_torch_compile_cpu():
    x, w, b, G, grad = _inputs((2, 6, 5, 5, 3), torch.float32, True)

    def f(x, w, b):
        return (gn.leaky_relu_group_norm(x, w, b, G, backend="cpp") * 2.0).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args_c = [t.clone().requires_grad_() for t in (x, w, b)]
    args_e = [t.clone().requires_grad_() for t in (x, w, b)]
    compiled(*args_c).backward()
    f(*args_e).backward()
    for a, e in zip(args_c, args_e):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_bad_inputs_raise_clear_errors(backend):
    x = torch.randn(2, 6, 4, 4)
    w, b = torch.ones(6), torch.zeros(6)
    with pytest.raises(ValueError, match="does not divide"):
        gn.leaky_relu_group_norm(x, w, b, 4, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        gn.leaky_relu_group_norm(x, torch.ones(5), b, 2, backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        gn.leaky_relu_group_norm(x, w, torch.zeros(6, 1), 2, backend=backend)
    with pytest.raises(TypeError, match="must be float32, float64, bfloat16 or float16"):
        gn.leaky_relu_group_norm(x.to(torch.int32), w, b, 2, backend=backend)
    with pytest.raises(ValueError, match="must be 4-D"):
        gn.leaky_relu_group_norm(x[0], w, b, 2, backend=backend)
    with pytest.raises(ValueError, match="positive int"):
        gn.leaky_relu_group_norm(x, w, b, 0, backend=backend)
    with pytest.raises(TypeError, match="weight must be floating point"):
        gn.leaky_relu_group_norm(x, torch.ones(6, dtype=torch.int64), b, 2, backend=backend)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        gn.leaky_relu_group_norm(x, w, b, 2, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="residual must match x"):
        gn.leaky_relu_group_norm(x, w, b, 2, residual=x[:1], backend=backend)
    with pytest.raises(ValueError, match="residual must match x"):
        gn.leaky_relu_group_norm(x, w, b, 2, residual=x.double(), backend=backend)


@needs_cpp
def test_cpp_kernel_checks_its_arguments():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(RuntimeError, match="must be >= 1 and divide"):
        gn.FORWARD(x, torch.ones(6), torch.zeros(6), 4, 1e-5, 0.01)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        gn.FORWARD(x[:, :, :, ::2], torch.ones(6), torch.zeros(6), 2, 1e-5, 0.01)
    with pytest.raises(RuntimeError, match="residual must match x"):
        gn.FORWARD(x, torch.ones(6), torch.zeros(6), 2, 1e-5, 0.01, x.to(memory_format=torch.channels_last))

# --------------------------------------------------------------------------------------------------------
# the Triton launchers called directly (no dispatch), odd and minimal shapes, outputs NaN-filled
# --------------------------------------------------------------------------------------------------------
# LeakyReLU -> GroupNorm

NORM_SHAPES = [  # (N, C, H, W, groups)
    (2, 3, 1, 1, 1), (2, 1, 1, 1, 1), (1, 7, 3, 3, 7), (2, 6, 5, 3, 2), (1, 5, 17, 17, 1), (3, 40, 9, 7, 4), (1, 37, 20, 20, 1)]


def _norm_inputs(shape, dtype, channels_last):
    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(N * 1000 + C * 10 + H)
    x = (torch.randn(N, C, H, W, generator=g, dtype=torch.float64) + 0.3).to(TRITON_DEVICE)
    w = (1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(TRITON_DEVICE)
    b = (0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(TRITON_DEVICE)
    res = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(TRITON_DEVICE)
    grad = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(TRITON_DEVICE)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(dtype).contiguous(memory_format=fmt) for t in (x, res, grad)] + [w, b, G]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_norm_launchers_match_reference(shape, channels_last, dtype, triton_loader):
    k = triton_loader("leaky_relu_group_norm")
    x, res, grad, w, b, G = _norm_inputs(shape, dtype, channels_last)
    # float64 truth from the reference with autograd
    xr, wr, br = x.double().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    want = gn.leaky_relu_group_norm_ref(xr, wr, br, G, 1e-5, 0.01, residual=res.double())
    want.backward(grad.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    wt, bt = w.to(gn.stats_dtype(dtype)), b.to(gn.stats_dtype(dtype))
    out, mean, rstd = k.leaky_relu_group_norm(x, wt, bt, G, 1e-5, 0.01, residual=res)
    assert out.stride() == x.stride() and out.dtype == dtype
    close_rel(out, want, tol, "out")
    y = torch.nn.functional.leaky_relu(x.double(), 0.01).reshape(x.shape[0], G, -1)
    close_rel(mean, y.mean(-1), tol, "mean")
    close_rel(rstd, 1 / (y.var(-1, unbiased=False) + 1e-5).sqrt(), tol, "rstd")
    dx, dw, db = k.leaky_relu_group_norm_backward(grad, x, wt, mean, rstd, G, 0.01)
    assert dx.stride() == x.stride()
    gtol = tol if dtype != torch.bfloat16 else 5e-2
    g_max = grad.double().abs().max().item()
    close_rel(dx, xr.grad, gtol, "dx", scale=g_max * rstd.double().max().item() * w.abs().max().item())
    close_rel(dw, wr.grad, gtol, "dweight", scale=g_max * x[0, 0].numel() * x.shape[0])
    close_rel(db, br.grad, gtol, "dbias")


def test_norm_statistics_split_over_programs(triton_loader):
    """At batch 1 one image's reduction is split over many programs (several spatial chunks and channel
    blocks per group) and merged: the statistics do not depend on the split."""
    k = triton_loader("leaky_relu_group_norm")
    x, res, grad, w, b, _ = _norm_inputs((1, 70, 40, 40, 1), torch.float32, False)
    chunk, n_chunks = k._chunking(1 * 3, 40 * 40, k._tile(70, 1600)[0])
    assert n_chunks > 1  # the case under test: several chunks per image
    out, mean, rstd = k.leaky_relu_group_norm(x, w.float(), b.float(), 1, 1e-5, 0.01)
    close_rel(out, gn.leaky_relu_group_norm_ref(x.double(), w, b, 1, 1e-5, 0.01), 1e-5, "out")


