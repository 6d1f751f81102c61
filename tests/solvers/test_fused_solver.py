"""The fused solver engine (ldeq_fast/solvers/fused.py) against the reference solvers, per backend.

'torch' runs the engine on the ops' PyTorch references, 'cpp' on the C++ kernels (skipped if the
extension is not built), 'triton' on the Triton kernels under TRITON_INTERPRET=1 (on CPU, in the child run of tests/interpreter_child.py),
CUDA-device tests only with a GPU.
"""
import os

import pytest
import torch

from ldeq_fast import _ext, notices
from ldeq_fast.solvers import solve
from ldeq_fast.solvers.fused import anderson_fused
from ldeq_fast.solvers.reference import anderson_reference, fixed_point_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


pytestmark = pytest.mark.usefixtures("one_thread")


def contractive(B, D, dtype, scale=0.9, seed=0, device="cpu"):
    """Per-sample f(z) = tanh(W_b z + c_b), ||W_b||_2 = scale < 1."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    W = (scale * W / torch.linalg.matrix_norm(W, 2)[:, None, None]).to(dtype).to(device)
    c = torch.randn(B, D, generator=g, dtype=dtype).to(device)

    def f(z):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z.reshape(B, -1)) + c).reshape(z.shape)

    return f, (W, c)


TRITON = pytest.param("triton", marks=pytest.mark.triton)


@pytest.fixture(params=["torch-ops", "cpp", TRITON])
def backend(request):
    if request.param == "cpp" and not _ext.has_cpp():
        pytest.skip(f"C++ extension not built: {_ext.missing_reason()}")
    if request.param == "triton":
        pytest.importorskip("triton")
        if not INTERPRETED:
            pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py)")
    return {"torch-ops": "torch", "cpp": "cpp", "triton": "triton"}[request.param]


def fused_solve(f, z0, backend, method="anderson", damping=1.0, **kw):
    """solve() for the kernel backends; the engine on the ops' references for 'torch' (solve() would
    run the reference solver itself)."""
    if backend != "torch":
        return solve(f, z0, method=method, damping=damping, backend=backend, **kw)
    if method == "fpi":
        kw.update(m=1, beta=damping)
    return anderson_fused(f, z0, backend="torch", method=method, **kw)


@pytest.fixture(params=["torch-ops", "cpp"])
def logic_backend(request):
    """For tests of the engine's logic, which does not depend on the kernels: the Triton ops are
    checked against the same references in tests/ops/test_anderson.py, and the interpreter is slow."""
    if request.param == "cpp" and not _ext.has_cpp():
        pytest.skip(f"C++ extension not built: {_ext.missing_reason()}")
    return {"torch-ops": "torch", "cpp": "cpp"}[request.param]


def _tols(dtype):
    return (1e-5, 1e-7) if dtype == torch.float32 else (1e-10, 1e-13)


def _assert_same_solve(z, st, zr, sr, dtype):
    rtol, atol = _tols(dtype)
    rel = ((z - zr).norm() / zr.norm()).item()
    assert rel <= rtol, f"fixed point differs from the reference by {rel:.2e} (relative)"
    assert torch.equal(st.nstep, sr.nstep)
    assert torch.equal(st.converged, sr.converged) and torch.equal(st.diverged, sr.diverged)
    torch.testing.assert_close(st.best_residual, sr.best_residual, rtol=1e-3 if dtype == torch.float32 else 1e-7,
                               atol=10 * atol)
    torch.testing.assert_close(st.abs_residual, sr.abs_residual, rtol=1e-3 if dtype == torch.float32 else 1e-7,
                               atol=10 * atol)
    assert torch.equal(st.trace.isnan(), sr.trace.isnan())
    # residuals of late iterates are small differences of nearby values: compare them on the scale of the first
    scale = sr.trace[0].abs().max().item()
    torch.testing.assert_close(st.trace.nan_to_num(), sr.trace.nan_to_num(), rtol=0,
                               atol=(1e-5 if dtype == torch.float32 else 1e-10) * scale)
    assert st.trace.shape == sr.trace.shape and st.trace.dtype == sr.trace.dtype


# With D < m the residual history is rank-deficient and the weights are pinned only by the regulariser:
# then fp32 rounding of x_j + g_j (reference) vs f(x_j) (engine) is amplified past 1e-5; D = 1 uses m = 1.
CASES = [  # B, D, m, beta, max_iter, tol
    (1, 1, 1, 1.0, 8, 1e-5),
    (3, 37, 6, 1.0, 40, 1e-5),
    (8, 101, 2, 0.8, 30, 1e-4),
    (3, 37, 6, 1.0, 7, 0.0),       # max_iter < m, never converges: every slot path
]


def _cases(cases, triton_too):
    """(backend, case, dtype) for every kernel backend; 'triton' (the interpreter is slow) only where
    ``triton_too(case, dtype)``, so that no Triton case is collected only to be skipped."""
    out = []
    for dtype, dname in ((torch.float32, "f32"), (torch.float64, "f64")):
        for i, case in enumerate(cases):
            for b in ("torch-ops", "cpp", "triton"):
                if b != "triton" or triton_too(case, dtype):
                    out.append(pytest.param(b, case, dtype, id=f"{b}-case{i}-{dname}",
                                            marks=pytest.mark.triton if b == "triton" else ()))
    return out


# interpreter: the small fp32 cases are enough (fp64 is covered op by op in test_anderson.py)
@pytest.mark.parametrize("backend,case,dtype", _cases(CASES, lambda c, dt: c[0] <= 3 and c[1] >= 2
                                                      and dt == torch.float32), indirect=["backend"])
def test_anderson_matches_reference(backend, case, dtype):
    B, D, m, beta, max_iter, tol = case
    if backend == "triton":
        max_iter = min(max_iter, 9)     # interpreter: enough to wrap the ring (m = 6)
    f, _ = contractive(B, D, dtype, seed=B + D)
    z0 = torch.randn(B, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    zr, sr = anderson_reference(f, z0, max_iter=max_iter, tol=tol, m=m, beta=beta)
    z, st = fused_solve(f, z0, backend, max_iter=max_iter, tol=tol, m=m, beta=beta)
    assert st.backend == backend and st.method == "anderson" and z.shape == z0.shape and z.dtype == dtype
    _assert_same_solve(z, st, zr, sr, dtype)


# interpreter: one fp32 case is enough
@pytest.mark.parametrize("backend,case,dtype", _cases([(1.0, "rel"), (0.7, "abs")],
                                                      lambda c, dt: c[0] != 1.0 and dt == torch.float32),
                         indirect=["backend"])
def test_fpi_matches_reference(backend, case, dtype):
    damping, stop_mode = case
    f, _ = contractive(3, 37, dtype, seed=4)
    z0 = torch.zeros(3, 37, dtype=dtype)
    zr, sr = fixed_point_reference(f, z0, max_iter=25, tol=1e-4, stop_mode=stop_mode, damping=damping)
    z, st = fused_solve(f, z0, backend, method="fpi", max_iter=25, tol=1e-4, stop_mode=stop_mode,
                        damping=damping)
    assert st.method == "fpi"
    _assert_same_solve(z, st, zr, sr, dtype)


@pytest.mark.parametrize("lam_mode", ["scaled", "absolute"])
def test_lam_modes_match_reference(logic_backend, lam_mode):
    f, _ = contractive(4, 53, torch.float64, scale=0.97, seed=9)
    z0 = torch.zeros(4, 53, dtype=torch.float64)
    zr, sr = anderson_reference(f, z0, max_iter=40, tol=1e-9, lam_mode=lam_mode)
    z, st = fused_solve(f, z0, logic_backend, max_iter=40, tol=1e-9, lam_mode=lam_mode)
    _assert_same_solve(z, st, zr, sr, torch.float64)


def test_image_shapes_and_layouts(logic_backend):
    """Batch-first states of any rank; f may return a non-contiguous (channels_last) tensor."""
    B, C, H, W = 2, 3, 5, 7
    c = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2))

    def f(z):
        return (0.5 * torch.tanh(z) + c).contiguous(memory_format=torch.channels_last)

    z0 = torch.zeros(B, C, H, W).contiguous(memory_format=torch.channels_last)
    zr, sr = anderson_reference(f, z0, max_iter=20, tol=1e-6)
    z, st = fused_solve(f, z0, logic_backend, max_iter=20, tol=1e-6)
    assert z.shape == z0.shape
    _assert_same_solve(z, st, zr, sr, torch.float32)
    assert torch.equal(z0, torch.zeros_like(z0))            # z0 is not written


def test_batch_invariance(logic_backend):
    B, D = 8, 53
    f, (W, c) = contractive(B, D, torch.float32, seed=3)
    z0 = torch.randn(B, D, generator=torch.Generator().manual_seed(4)) * 0.1
    z, st = fused_solve(f, z0, logic_backend, max_iter=40, tol=1e-5)
    for i in (0, 5):
        def fi(v, i=i):
            return torch.tanh(torch.einsum("bij,bj->bi", W[i:i + 1], v) + c[i:i + 1])

        zi, sti = fused_solve(fi, z0[i:i + 1], logic_backend, max_iter=40, tol=1e-5)
        torch.testing.assert_close(z[i:i + 1], zi, rtol=1e-5, atol=1e-6)
        assert st.nstep[i] == sti.nstep[0] and st.converged[i] == sti.converged[0]


@pytest.mark.parametrize("method", ["anderson", "fpi"])
def test_max_iter_one_returns_f_of_z0(backend, method):
    f, _ = contractive(3, 11, torch.float64, seed=5)
    z0 = torch.randn(3, 11, dtype=torch.float64)
    z, st = fused_solve(f, z0, backend, method=method, max_iter=1, tol=0.0)
    assert torch.equal(z, f(z0))
    assert (st.nstep == 1).all() and st.trace.shape == (1, 3)


def test_max_iter_two_returns_best_not_z0(backend):
    f, _ = contractive(3, 9, torch.float64, seed=6)
    z0 = torch.randn(3, 9, dtype=torch.float64) * 3
    zr, sr = anderson_reference(f, z0, max_iter=2, tol=0.0)
    z, st = fused_solve(f, z0, backend, max_iter=2, tol=0.0)
    _assert_same_solve(z, st, zr, sr, torch.float64)
    assert not torch.isclose(z, z0).all(dim=1).any()
    x1 = f(z0)
    # each sample returns the image of whichever iterate (z0 or f(z0)) had the lower residual
    for b in range(3):
        assert torch.allclose(z[b], x1[b]) or torch.allclose(z[b], f(x1)[b])


def test_nan_sample_diverges_alone(logic_backend):
    B, D = 3, 17
    f0, _ = contractive(B, D, torch.float32, seed=7)

    def f(z):
        out = f0(z)
        if f.calls >= 3:                       # sample 1 blows up at its fourth evaluation
            out[1, 4] = float("nan")
        f.calls += 1
        return out

    f.calls = 0
    z0 = torch.zeros(B, D)
    z, st = fused_solve(f, z0, logic_backend, max_iter=30, tol=1e-5)
    f.calls = 0
    zr, sr = anderson_reference(f, z0, max_iter=30, tol=1e-5)
    assert st.diverged.tolist() == [False, True, False] and st.converged.tolist() == [True, False, True]
    assert st.nstep[1] == 4 and torch.isfinite(z).all()
    _assert_same_solve(z, st, zr, sr, torch.float32)
    # the healthy samples do not notice
    z_ok, st_ok = fused_solve(f0, z0, logic_backend, max_iter=30, tol=1e-5)
    torch.testing.assert_close(z[[0, 2]], z_ok[[0, 2]], rtol=0, atol=0)
    assert torch.equal(st.nstep[[0, 2]], st_ok.nstep[[0, 2]])


def test_check_every_and_fixed_iters_do_not_change_the_answer(logic_backend):
    f, _ = contractive(3, 29, torch.float32, seed=8)
    z0 = torch.zeros(3, 29)
    z1, s1 = anderson_fused(f, z0, max_iter=30, tol=1e-5, backend=logic_backend, check_every=1)
    for kw in ({"check_every": 3}, {"check_every": 0}, {"fixed_iters": True}):
        z, s = anderson_fused(f, z0, max_iter=30, tol=1e-5, backend=logic_backend, **kw)
        assert torch.equal(z, z1), kw
        for name in ("nstep", "best_residual", "abs_residual", "rel_residual", "converged", "diverged"):
            assert torch.equal(getattr(s, name), getattr(s1, name)), (kw, name)
        assert torch.equal(s.trace.nan_to_num(-1.0), s1.trace.nan_to_num(-1.0))


def test_fixed_iters_under_torch_compile_fullgraph():
    """No host sync and no data-dependent Python in fixed-iteration mode: the whole solve traces as one
    graph (the C++ ops through their fake impls) and matches eager."""
    if not _ext.has_cpp():
        pytest.skip(f"C++ extension not built: {_ext.missing_reason()}")
    torch._dynamo.reset()
    f, _ = contractive(3, 37, torch.float32, seed=10)

    def run(z0):
        z, st = anderson_fused(f, z0, max_iter=4, tol=1e-4, backend="cpp", fixed_iters=True)
        return z, st.nstep, st.trace, st.converged, st.best_residual

    z0 = torch.randn(3, 37)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(z0), run(z0)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_bad_arguments_and_bad_f():
    f, _ = contractive(2, 5, torch.float32)
    z0 = torch.zeros(2, 5)
    with pytest.raises(TypeError, match="dtype"):
        anderson_fused(lambda z: f(z).double(), z0, backend="torch")
    with pytest.raises(ValueError, match="shape"):
        anderson_fused(lambda z: f(z)[:, :4], z0, backend="torch")
    with pytest.raises(TypeError, match="float32 or float64"):
        anderson_fused(f, z0.half(), backend="torch")
    with pytest.raises(ValueError, match="history length"):
        anderson_fused(f, z0, m=0, backend="torch")
    with pytest.raises(ValueError, match="lam_mode"):
        anderson_fused(f, z0, lam_mode="relative", backend="torch")
    with pytest.raises(ValueError, match="check_every"):
        anderson_fused(f, z0, check_every=-1, backend="torch")


# ---------------------------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_triton_matches_reference(dtype):
    pytest.importorskip("triton")
    for B, D, m, beta in [(1, 1, 1, 1.0), (3, 37, 6, 1.0), (8, 301, 2, 0.8), (8, 98 * 64 + 3, 6, 1.0)]:
        f, _ = contractive(B, min(D, 301), dtype, seed=D, device="cuda")
        if D > 301:  # a cheap elementwise map for the large state
            c = torch.randn(B, D, dtype=dtype, device="cuda")

            def f(z, c=c):
                return 0.5 * torch.tanh(z) + c
        z0 = torch.randn(B, D, dtype=dtype, device="cuda")
        zr, sr = anderson_reference(f, z0, max_iter=30, tol=1e-5, m=m, beta=beta)
        z, st = solve(f, z0, max_iter=30, tol=1e-5, m=m, beta=beta, backend="triton")
        assert st.backend == "triton"
        _assert_same_solve(z.cpu(), _cpu(st), zr.cpu(), _cpu(sr), dtype)


def _cpu(st):
    for name in ("nstep", "best_residual", "abs_residual", "rel_residual", "trace", "converged", "diverged"):
        setattr(st, name, getattr(st, name).cpu())
    return st


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    pytest.importorskip("triton")
    B, D = 4, 98 * 64 * 64
    c = torch.randn(B, D, device="cuda")

    def f(z):
        return 0.5 * torch.tanh(z) + c

    static_z0 = torch.zeros(B, D, device="cuda")

    def run():
        return anderson_fused(f, static_z0, max_iter=8, tol=1e-6, backend="triton", fixed_iters=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compiles the kernels outside the capture
            run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z_static, st_static = run()
    for scale in (0.0, 1.0):
        static_z0.copy_(torch.randn(B, D, device="cuda") * scale)
        graph.replay()
        torch.cuda.synchronize()
        z_eager, st_eager = run()
        torch.testing.assert_close(z_static, z_eager, rtol=1e-6, atol=1e-6)
        assert torch.equal(st_static.nstep, st_eager.nstep)
        zr, sr = anderson_reference(f, static_z0, max_iter=8, tol=1e-6)
        assert ((z_static - zr).norm() / zr.norm()).item() < 1e-5


# ---------------------------------------------------------------------------------------------------------
# published semantics on the fused engine (ldeq_fast/solvers/fused.py::published_fused) against the plain
# published solvers (ldeq_fast/solvers/published.py), and the backend a caller forces is the one that runs

PUBLISHED_CASES = [  # B, D, method, max_iter, tol, stop_mode, m, beta
    (1, 1, "anderson", 1, 0.0, "rel", 2, 1.0),     # minimal: X_2 is the only recorded iterate
    (3, 37, "anderson", 9, 0.0, "rel", 6, 1.0),    # ring wraps (N + 2 = 11 evaluations > m)
    (3, 37, "anderson", 20, 2e-3, "rel", 6, 1.0),  # batch-mean stop before max_iter
    (4, 29, "anderson", 7, 1e-3, "abs", 3, 0.8),   # beta != 1 (the published X_1 is f(z0) all the same)
    (1, 5, "anderson", 2, 0.0, "abs", 6, 1.0),     # max_iter < m
    (3, 37, "fpi", 25, 1e-3, "rel", 1, 1.0),
    (2, 11, "fpi", 4, 0.0, "abs", 1, 1.0),
]


def _published_oracle(f, z0, method, max_iter, tol, stop_mode, m, beta):
    from ldeq_fast.solvers import anderson_published, fixed_point_published

    if method == "anderson":
        return anderson_published(f, z0, max_iter, tol, stop_mode, m, 1e-4, beta)
    return fixed_point_published(f, z0, max_iter, tol, stop_mode)


def _check_published(backend, case, dtype=torch.float32):
    from ldeq_fast.solvers.fused import published_fused

    B, D, method, max_iter, tol, stop_mode, m, beta = case
    f, _ = contractive(B, D, dtype, scale=0.95, seed=B + D)
    z0 = torch.randn(B, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
    zr, sr = _published_oracle(f, z0, method, max_iter, tol, stop_mode, m, beta)
    if backend == "torch":  # the engine on the ops' references (solve() would run the plain solver)
        z, st = published_fused(f, z0, method, max_iter, tol, stop_mode, m, 1e-4, beta, backend="torch")
    else:
        z, st = solve(f, z0, method=method, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=1e-4,
                      beta=beta, semantics="published", backend=backend)
    assert st.backend == backend and st.semantics == "published" and st.method == method
    assert z.shape == z0.shape and z.dtype == dtype
    # the published code solves the bordered system by an fp32 LU, the engine in fp64: with a rank-deficient
    # history (D < m) the published weights carry ~1e-5 relative error (measured for case 0: published fp32
    # -1.903244, fp64 -1.903268, engine -1.903261)
    torch.testing.assert_close(z, zr, rtol=2e-5 if dtype == torch.float32 else 1e-10,
                               atol=2e-6 if dtype == torch.float32 else 1e-12)
    ex, exr = st.extra, sr.extra
    assert int(ex["n_iters"]) == exr["n_iters"] and int(ex["stability"]) == exr["stability"]
    assert st.nstep.tolist() == sr.nstep.tolist() and st.converged.tolist() == sr.converged.tolist()
    n = exr["n_iters"]
    torch.testing.assert_close(ex["trace_abs"][:n].double(), torch.tensor(exr["trace_abs"], dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ex["trace_rel"][:n].double(), torch.tensor(exr["trace_rel"], dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)
    assert ex["trace_abs"][n:].isnan().all()
    if method == "anderson":
        assert int(ex["nstep_best"]) == exr["nstep_best"]
    for got, want in ((st.best_residual, sr.best_residual), (st.abs_residual, sr.abs_residual),
                      (st.rel_residual, sr.rel_residual)):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(st.trace[:n].double(), sr.trace.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", PUBLISHED_CASES)
def test_published_semantics_on_the_engine(backend, case):
    if backend == "triton" and case[3] > 9:
        case = (*case[:3], 9, *case[4:])  # interpreter: fewer iterations (the stop cases still stop)
    _check_published(backend, case)


@pytest.mark.parametrize("case", [PUBLISHED_CASES[1], PUBLISHED_CASES[5]])
def test_published_semantics_on_the_engine_fp64(logic_backend, case):
    _check_published(logic_backend, case, torch.float64)


def test_published_engine_evaluates_f_as_published(logic_backend):
    """f is evaluated N + 2 times for Anderson with max_iter N (N for fpi), fewer once the batch mean stops."""
    from ldeq_fast.solvers.fused import published_fused

    f, _ = contractive(2, 13, torch.float32, seed=3)
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    for method, N, want in (("anderson", 5, 7), ("fpi", 5, 5)):
        calls.clear()
        published_fused(counted, torch.zeros(2, 13), method, N, 0.0, backend=logic_backend)
        assert len(calls) == want
    calls.clear()
    _, st = published_fused(counted, torch.zeros(2, 13), "anderson", 30, 1e-3, backend=logic_backend)
    assert len(calls) == int(st.extra["n_iters"]) + 2 < 32


def test_published_check_every_and_fixed_iters_do_not_change_the_answer(logic_backend):
    from ldeq_fast.solvers.fused import published_fused

    f, _ = contractive(3, 21, torch.float32, seed=6)
    z0 = torch.zeros(3, 21)
    z1, s1 = published_fused(f, z0, "anderson", 20, 1e-3, backend=logic_backend)
    for kw in ({"check_every": 3}, {"check_every": 0}, {"fixed_iters": True}):
        z2, s2 = published_fused(f, z0, "anderson", 20, 1e-3, backend=logic_backend, **kw)
        assert torch.equal(z1, z2) and int(s1.extra["n_iters"]) == int(s2.extra["n_iters"])


def test_forced_backend_is_honoured():
    """semantics='published' runs the backend asked for; broyden with a kernel backend is an error; 'auto'
    runs broyden's reference recorded as 'torch' with a warning."""
    from ldeq_fast import _ext
    from ldeq_fast.ops import recording_backends

    f, _ = contractive(2, 9, torch.float32, seed=1)
    z0 = torch.zeros(2, 9)
    kinds = ["torch"] + (["cpp"] if _ext.has_cpp() else [])
    for be in kinds:
        for method in ("anderson", "fpi"):
            with recording_backends() as ran:
                _, st = solve(f, z0, method=method, max_iter=4, semantics="published", backend=be)
            assert st.backend == be and ran["solver"] == be and st.semantics == "published"
            if be == "cpp":
                assert ran["anderson_update"] == "cpp" and ran["anderson_step"] == "cpp"
    for be in ("cpp", "triton"):
        with pytest.raises(ValueError, match=r"broyden.*" + be):
            solve(f, z0, method="broyden", max_iter=4, backend=be)
    notices._said.discard("broyden-auto")
    with pytest.warns(RuntimeWarning, match="broyden"), recording_backends() as ran:
        _, st = solve(f, z0, method="broyden", max_iter=4, backend="auto")
    assert st.backend == "torch" and ran["solver"] == "torch"
    with pytest.raises(ValueError, match="published"):
        solve(f, z0, method="broyden", semantics="published", backend="torch")
    with pytest.raises(ValueError, match="m >= 2"):
        solve(f, z0, m=1, semantics="published", backend="cpp" if _ext.has_cpp() else "auto")


@pytest.mark.triton
def test_published_model_parity_triton(triton_interpret_model):
    """The published-format model (tests/model/test_compat_published.py's tiny checkpoint) on the Triton engine and
    cell under the interpreter (one sample, one Anderson iteration: the interpreter is slow; the solver-level
    Triton tests above cover longer runs and fpi): landmarks within 1e-3 heatmap px of the plain published
    path, the same published logs, and what ran recorded as 'triton'."""
    import test_compat_published as P
    from test_published_checkpoint import published_args, write_published

    from ldeq_fast.ops import recording_backends

    path = triton_interpret_model / "final.pth.tar"
    write_published(path, published_args(max_iters=1, rel_diff_target=0.0, abs_diff_target=0.0, n_keypoints=P.K,
                                         z_width=P.K, heatmap_size=P.HM, im_size=P.IM))
    model, a = P.load_like_the_script(path, backend="triton")
    plain, _ = P.load_like_the_script(path, backend="torch")
    x, z0 = P.images(1, n=1), torch.zeros(1, P.K, P.HM, P.HM)
    with torch.no_grad(), recording_backends() as ran:
        out = model(x, mode="implicit", args=a, z0=z0)
    with torch.no_grad():
        ref = plain(x, mode="implicit", args=a, z0=z0)
    assert model.last_stats.backend == "triton" and model.last_stats.semantics == "published"
    assert ran["solver"] == ran["anderson_step"] == "triton"
    assert (out["keypoints"] - ref["keypoints"]).abs().max().item() * P.HM < 1e-3
    assert out["fwd_logs"]["n_iters"] == ref["fwd_logs"]["n_iters"] == 1
    # this random model's residual is at the fp32 floor (~1.5e-5) after one iteration: rounding-level agreement
    assert out["fwd_logs"]["final_rel_diff"] == pytest.approx(ref["fwd_logs"]["final_rel_diff"], abs=1e-5)


@pytest.fixture
def triton_interpret_model(tmp_path):
    pytest.importorskip("triton")
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py)")
    return tmp_path
