"""The numeric policy (ldeq_fast/numerics.py) on the paths users run: bf16 autocast with warm starts.

The DEQ state, the solver's history and its statistics stay float32 under any autocast; a z0 of any float
dtype is accepted; the cell may compute in bf16.  Checked for every entry point that takes a warm start —
LDEQ, RwRTracker / run_streams, compat.published.LDEQ, streaming.GraphedForward — on every backend: 'torch',
'cpp' (here), 'triton' (in the TRITON_INTERPRET=1 child run of tests/interpreter_child.py on CPU, on CUDA
tensors with a GPU), and the CUDA variants with a GPU.

This CPU may lack native bf16 (then a bf16 autocast runs the model in fp32: see
test_cpu_without_native_bf16_runs_fp32_with_a_warning); the tests here set LDEQ_FAST_ALLOW_SLOW_BF16=1 so the
cell really computes in bf16 on tiny models.
"""
import argparse
import os
import warnings

import pytest
import torch
from conftest import needs_cpp, tiny_config

from ldeq_fast import LDEQ, notices, numerics
from ldeq_fast.ops import triton_available
from ldeq_fast.solvers import solve

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def allow_bf16(monkeypatch):
    monkeypatch.setenv("LDEQ_FAST_ALLOW_SLOW_BF16", "1")


def _triton_ok():
    if not triton_available():
        pytest.skip("triton is not installed")
    if TRITON_DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py) or on a GPU")


# (backend, device): every backend on CPU, and the CUDA variants with a GPU
CASES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("auto", "cpu", id="cpp-cpu", marks=needs_cpp),
    pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param("auto", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
]


def _model(backend, device, **over):
    torch.manual_seed(0)
    return LDEQ(tiny_config(backend=backend, **over)).to(device).eval()


def _images(model, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, model.cfg.im_size, model.cfg.im_size, generator=g).to(device)


def _autocast(device):
    return torch.autocast(device, dtype=torch.bfloat16)


def _check_state(out, backend):
    assert out.z_star.dtype == torch.float32
    assert out.stats.best_residual.dtype == torch.float32 and out.stats.trace.dtype == torch.float32
    want = "torch" if backend == "torch" else ("triton" if out.z_star.is_cuda or INTERPRETED else "cpp")
    assert out.backends["solver"] == want and set(out.backends.values()) == {want}, out.backends


# ---------------------------------------------------------------------------------------------- the policy
def test_state_dtype_policy():
    assert numerics.state_dtype(torch.bfloat16) == torch.float32
    assert numerics.state_dtype(torch.float16) == torch.float32
    assert numerics.state_dtype(torch.float32) == torch.float32
    assert numerics.state_dtype(torch.float64) == torch.float64
    with pytest.raises(TypeError, match="floating-point"):
        numerics.to_state(torch.zeros(2, dtype=torch.int64), torch.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("method", ["anderson", "fpi"])
def test_solve_keeps_fp32_state_for_bf16_z0_and_f(backend, method):
    """solve(): a bf16 z0 and an f computing in bf16 give an fp32 state and fp32 statistics."""
    c = torch.randn(3, 40)

    def f(z):
        return (0.5 * torch.tanh(z) + c).to(torch.bfloat16)

    z, st = solve(f, torch.zeros(3, 40, dtype=torch.bfloat16), method=method, max_iter=8, tol=0.0, backend=backend)
    assert z.dtype == torch.float32 and st.best_residual.dtype == torch.float32
    zd, _ = solve(lambda x: 0.5 * torch.tanh(x) + c.double(), torch.zeros(3, 40, dtype=torch.float64),
                  method=method, max_iter=8, tol=0.0, backend=backend)
    assert zd.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- entry points
def _warm_start_under_autocast(backend, device):
    model = _model(backend, device)
    a, b = _images(model, 2, device, 0), _images(model, 2, device, 1)
    with torch.no_grad():
        ref = model(b, z0=model(a).z_star, max_iters=1)
        with _autocast(device):
            out = model(a)
            _check_state(out, backend)
            nxt = model(b, z0=out.z_star, max_iters=1)         # the documented RwR call
            _check_state(nxt, backend)
            for dtype in (torch.bfloat16, torch.float16, torch.float64):  # any float z0 is accepted
                assert model(b, z0=out.z_star.to(dtype), max_iters=1).z_star.dtype == torch.float32
    # the cell computed in bf16 (random weights: an unconverged solve amplifies the rounding, so no tight bound;
    # the trained demo model's bf16 agreement is bench/bf16_agreement.py's)
    assert not torch.equal(nxt.keypoints, ref.keypoints)
    assert torch.isfinite(nxt.keypoints).all() and nxt.keypoints.min() >= 0 and nxt.keypoints.max() < 1


@pytest.mark.parametrize("backend, device", CASES)
def test_ldeq_warm_start_under_autocast(backend, device):
    _warm_start_under_autocast(backend, device)


@pytest.mark.triton
def test_triton_ldeq_warm_start_under_autocast():
    _triton_ok()
    _warm_start_under_autocast("triton", TRITON_DEVICE)


@pytest.mark.parametrize("backend, device", CASES)
def test_tracker_and_run_streams_under_autocast(backend, device):
    from ldeq_fast.video.streams import run_streams
    from ldeq_fast.video.tracker import RwRTracker, TrackerConfig

    model = _model(backend, device)
    frames = [_images(model, 3, device, s) for s in range(2)]
    for mode in ("warm", "prox"):
        tracker = RwRTracker(model, TrackerConfig(mode=mode, reset_displacement=None))
        with torch.no_grad(), _autocast(device):
            first = tracker.step(frames[0], ["a", "b", "c"])
            second = tracker.step(frames[1], ["a", "b", "c"])
        assert first.reset.all() and not second.reset.any()
        assert all(s.z.dtype == torch.float32 for s in tracker.state.values())
        assert second.keypoints.dtype == torch.float32 and torch.isfinite(second.keypoints).all()
    videos = [[f[i] for f in frames] for i in range(3)]
    with torch.no_grad(), _autocast(device):
        res = run_streams(RwRTracker(model, TrackerConfig(mode="warm")), videos, slots=2)
    assert res["frames"] == 6 and all(k.shape == (2, model.cfg.n_keypoints, 2) for k in res["keypoints"])


def _published_args(**over):
    a = dict(landmark_model_name="ldeq", cell_name="Cell0", model_mode="implicit", explicit_depth=2,
             injection_width=8, cell_base_width=8, cell_width_increment=4, cell_gn_groups=1,
             cell_use_bn_for_explicit=False, cell_norm="softargmax", cell_softargmax_beta=1.0,
             cell_learn_softargmax_beta=False, n_keypoints=19, cell_extra_latent_width=0, z_width=19,
             heatmap_size=16, im_size=64, z0_mode="zeros", solver="anderson", stop_mode="rel",
             abs_diff_target=5e-3, rel_diff_target=5e-3, anderson_m=6, anderson_lam=1e-4, anderson_beta=1.0,
             max_iters=3, stochastic_max_iters=False, take_one_less_inference_step=False, JFB=False,
             verbose_solver=False)
    a.update(over)
    return argparse.Namespace(**a)


@pytest.mark.parametrize("fast, backend, device", [
    pytest.param(False, "torch", "cpu", id="published-cpu"),
    pytest.param(True, "auto", "cpu", id="fast-cpu", marks=needs_cpp),
    pytest.param(False, "torch", "cuda", id="published-cuda", marks=pytest.mark.gpu),
    pytest.param(True, "auto", "cuda", id="fast-cuda", marks=pytest.mark.gpu),
])
def test_compat_published_warm_start_under_autocast(fast, backend, device):
    from ldeq_fast.compat.published import LDEQ as PublishedLDEQ

    args = _published_args()
    torch.manual_seed(0)
    model = PublishedLDEQ(args, fast=fast, backend=backend).to(device).eval()
    x, y = torch.randn(2, 3, 64, 64, device=device), torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad(), _autocast(device):
        out = model(x, mode="implicit", args=args, z0=torch.zeros(2, 19, 16, 16, device=device, dtype=torch.bfloat16))
        args.max_iters = 1                                   # the published RwR recipe
        nxt = model(y, mode="implicit", args=args, z0=out["z_star"])
    assert out["z_star"].dtype == torch.float32 and nxt["z_star"].dtype == torch.float32
    assert torch.isfinite(nxt["keypoints"]).all()


@pytest.mark.parametrize("backend, device", CASES)
def test_graphed_forward_warm_start_under_autocast(backend, device):
    from ldeq_fast.streaming import GraphedForward

    model = _model(backend, device)
    a, b = _images(model, 2, device, 0), _images(model, 2, device, 1)
    gf = GraphedForward(model, batch=2, iters=1)
    with torch.no_grad(), _autocast(device):
        first = gf(a)
        nxt = gf(b, first.z_star.to(torch.bfloat16))
    assert first.z_star.dtype == torch.float32 and nxt.z_star.dtype == torch.float32
    assert torch.isfinite(nxt.keypoints).all()


# ---------------------------------------------------------------------------------------------- bf16 trap
def test_cpu_without_native_bf16_runs_fp32_with_a_warning(monkeypatch):
    """On a CPU without native bf16 a bf16 autocast forward runs fp32 (same answer as fp32) and says so once."""
    monkeypatch.delenv("LDEQ_FAST_ALLOW_SLOW_BF16")
    monkeypatch.setattr(numerics, "native_bf16", lambda device_type: False)
    monkeypatch.setattr(notices, "_said", set())
    model = _model("torch", "cpu")
    x = _images(model, 2, "cpu")
    with torch.no_grad():
        want = model(x)
        with warnings.catch_warnings(record=True) as caught, _autocast("cpu"):
            warnings.simplefilter("always")
            got = model(x)
            model(x)
    assert torch.equal(got.keypoints, want.keypoints)
    msgs = [str(w.message) for w in caught if "no native bf16" in str(w.message)]
    assert len(msgs) == 1, msgs
