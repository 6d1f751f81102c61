"""The whole model on backend 'triton' against the reference backend 'torch', by value, on the same weights:
a cold solve, an RwR warm start (z0 = the previous frame's z*), fixed iterations (streaming.GraphedForward),
the tracker (video.tracker.RwRTracker), and a training step (forward solve, implicit backward, the gradient of
every parameter) through the Triton ops.

On CPU these run in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py), natively on CUDA with a GPU.
The interpreter runs every Triton program in Python, so the model is tiny_config's (19 landmarks, 64x64 images,
16x16 heatmaps) made contractive: the cell's weights on z (its first conv's z channels) are scaled down until f
is a contraction in z, checked below.  A contraction damps rounding differences between the backends instead of
amplifying them, so the answers must agree to about float32 rounding; the bounds are looser than that by
orders of magnitude and still far below anything visible:

* keypoints within KP_TOL_PX = 1e-3 heatmap pixels (keypoints are in [0, 1) of the heatmap: px = kp * size);
* gradients within GRAD_RTOL = 1e-3 relative, per parameter tensor: ||g - g_ref|| / ||g_ref||.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from ldeq_fast import LDEQ
from ldeq_fast.ops import triton_available

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
KP_TOL_PX = 1e-3
GRAD_RTOL = 1e-3
Z_SCALE = 0.03            # the cell's weights on z: f's Lipschitz constant in z at most ~0.4 here (checked: < 0.5)
BATCH = 1                 # the interpreter's time is per program: one image per call keeps the set ~3 minutes
OPS = ("anderson_mix", "anderson_step", "anderson_update", "heatmap_keypoints", "leaky_relu_group_norm",
       "softargmax_heatmaps")

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_thread")]


SOLVE = dict(max_iters=12, rel_tol=1e-5, grad_mode="ift")


def _model(backend: str, **over) -> LDEQ:
    torch.manual_seed(0)
    model = LDEQ(tiny_config(**{**SOLVE, "backend": backend, **over}))
    K = model.cfg.n_keypoints
    with torch.no_grad():
        model.deq_layer.cell.tail.conv.weight[:, :K] *= Z_SCALE   # cat[z, x]: z's channels come first
    return model.to(DEVICE).eval()


def _lipschitz_in_z(model: LDEQ, images: torch.Tensor) -> float:
    """max over random directions of ||f(z + d) - f(z)|| / ||d|| around the fixed point (reference ops)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        f = model.cell_fn(model.injection(images))
        z = model(images).z_star
        ratios = []
        for _ in range(8):
            d = 1e-3 * torch.randn(z.shape, generator=g).to(z.device)
            ratios.append(((f(z + d) - f(z)).norm() / d.norm()).item())
    return max(ratios)


@pytest.fixture(scope="module")
def models():
    """(triton model, reference model) with the same weights and buffers.  (The CPU plan, measured conv layouts
    for CPU inference, is off in the tests, see conftest.py; it is not the Triton path's either.)"""
    if not triton_available():
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py) or on a GPU")
    ref = _model("torch")
    tri = _model("triton")
    tri.load_state_dict(ref.state_dict())
    lip = max(_lipschitz_in_z(ref, x) for seed in range(5) for x in _frames(3, seed))  # every input used below
    assert lip < 0.5, f"the test model is not contractive in z (Lipschitz estimate {lip:.2f})"
    return tri, ref


@pytest.fixture(scope="module")
def cold(models):
    """The cold solves of frame 0 (the warm-start test goes on from their z*)."""
    tri, ref = models
    x = _frames(3)[0]
    with torch.no_grad():
        return tri(x), ref(x)


def _frames(n: int, seed: int = 0) -> list[torch.Tensor]:
    """n batches of images: a random image and small changes of it from frame to frame, as in a video.  (White
    noise: smooth low-contrast images give near-tied heatmap maxima, where the softargmax is far from
    contractive.)"""
    g = torch.Generator().manual_seed(seed)
    size = tiny_config().im_size
    base = torch.randn(BATCH, 3, size, size, generator=g)
    return [(base + 0.1 * t * torch.randn(base.shape, generator=g)).to(DEVICE) for t in range(n)]


def _assert_keypoints(got: torch.Tensor, want: torch.Tensor, size: int, what: str) -> None:
    err = ((got - want).abs().max() * size).item()
    assert err <= KP_TOL_PX, f"{what}: keypoints differ by {err:.2e} heatmap px (> {KP_TOL_PX})"


def _assert_all_triton(out) -> None:
    assert out.backends.get("solver") == "triton", out.backends
    for op in OPS:
        assert out.backends.get(op) == "triton", f"{op} did not run on triton: {out.backends}"


def test_cold_solve(models, cold):
    """Both converge (rel. residual 1e-5, f a contraction with L < 0.5), so each z* is within ~2e-5 (relative)
    of the fixed point: keypoints within ~3e-4 px of each other at 16x16 heatmaps, below KP_TOL_PX.  (The
    iteration counts may differ: 'torch' runs the reference solver, 'triton' the fused engine.)"""
    tri, _ = models
    got, want = cold
    _assert_all_triton(got)
    assert set(want.backends.values()) == {"torch"}, want.backends
    assert got.extra["z0"] == want.extra["z0"] == "zeros"
    assert got.stats.converged.all() and want.stats.converged.all()
    _assert_keypoints(got.keypoints, want.keypoints, tri.cfg.heatmap_size, "cold solve")


def test_warm_start_rwr(models, cold):
    """Frames 1, 2 start from each backend's own z* of the frame before and run one solver iteration (RwR)."""
    tri, ref = models
    zt, zr = cold[0].z_star, cold[1].z_star
    with torch.no_grad():
        for t, x in enumerate(_frames(3)[1:], 1):
            got, want = tri(x, z0=zt, max_iters=1), ref(x, z0=zr, max_iters=1)
            _assert_all_triton(got)
            assert got.extra["z0"] == "given" and (got.stats.nstep == 1).all()
            _assert_keypoints(got.keypoints, want.keypoints, tri.cfg.heatmap_size, f"warm start, frame {t}")
            zt, zr = got.z_star, want.z_star


def test_fixed_iterations_graphed_forward(models):
    from ldeq_fast.streaming import GraphedForward

    tri, ref = models
    frames = _frames(2, seed=2)
    # on CUDA the triton model's forward is captured as a CUDA graph; the reference solver cannot be captured
    gt, gr = GraphedForward(tri, batch=BATCH, iters=2), GraphedForward(ref, batch=BATCH, iters=2, use_graph=False)
    with torch.no_grad():
        zt = zr = None
        for t, x in enumerate(frames):
            got, want = gt(x, zt), gr(x, zr)
            _assert_all_triton(got)
            _assert_keypoints(got.keypoints, want.keypoints, tri.cfg.heatmap_size, f"fixed iterations, frame {t}")
            zt, zr = got.z_star, want.z_star


def test_tracker(models):
    from ldeq_fast.ops import recording_backends
    from ldeq_fast.video.tracker import RwRTracker, TrackerConfig

    tri, ref = models
    cfg = TrackerConfig(mode="warm", reset_displacement=None)
    tt, tr = RwRTracker(tri, cfg), RwRTracker(ref, cfg)
    streams = [f"s{i}" for i in range(BATCH)]
    for t, x in enumerate(_frames(3, seed=3)):
        with recording_backends() as ran:
            got = tt.step(x, streams)
        want = tr.step(x, streams)
        assert {op: ran.get(op) for op in OPS} == dict.fromkeys(OPS, "triton"), ran
        assert torch.equal(got.reset, want.reset) and torch.equal(got.cell_evals, want.cell_evals)
        _assert_keypoints(got.keypoints, want.keypoints, tri.cfg.heatmap_size, f"tracker, frame {t}")


def test_training_step(models):
    """Forward solve, implicit (IFT) backward, gradients of all parameters, in training mode (BatchNorm batch
    statistics; the triton model's lean training path: checkpointed stem, norm outputs recomputed).

    NCHW here: on CPU, float32 training with channels_last=True (the fast path's NHWC weights) gives gradients
    up to ~3e-2 relative off the float64 truth with backend 'cpp' too (measured on this tiny model: 'torch' and
    NCHW 'cpp' ~5e-5; every backend agrees to 1e-9 in float64), a CPU fast-path precision problem of its own,
    not the Triton ops'."""
    _, ref = models
    tri = _model("triton", channels_last=False)
    tri.load_state_dict(ref.state_dict())
    (x,) = _frames(1, seed=4)
    target = torch.rand(BATCH, tri.cfg.n_keypoints, 2, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads, losses = [], []
    for model in (tri, ref):
        model.train()
        model.zero_grad(set_to_none=True)
        try:
            out = model(x)
            loss = F.mse_loss(out.keypoints, target) + 0.1 * out.uncertainty.mean()
            loss.backward()
        finally:
            model.eval()
        if model is tri:
            _assert_all_triton(out)
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys()
    total = torch.sqrt(sum(g.norm() ** 2 for g in grads[1].values())).item()
    for name, want in grads[1].items():
        got = grads[0][name]
        assert want is not None and got is not None, f"{name}: no gradient"
        # two parameters have an exactly zero true gradient (the head's bias, which the softargmax's max shift
        # cancels, and the last GroupNorm's bias before it): what float32 leaves of a cancelled sum is rounding
        # noise of the size of the terms, so a gradient below 1e-3 of the whole gradient's norm is held to
        # GRAD_RTOL of that floor (1e-6 of the whole: ~10 float32 ulps) instead of to its own size
        scale = max(want.norm().item(), 1e-3 * total)
        rel = (got - want).norm().item() / scale
        assert rel <= GRAD_RTOL, f"{name}: gradient differs by {rel:.2e} relative (> {GRAD_RTOL})"
