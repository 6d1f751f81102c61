import dataclasses
import json
import pathlib

import pytest
import torch
from conftest import REPO, needs_cpp

from ldeq_fast import LDEQ, LDEQConfig

DATA = pathlib.Path(__file__).parent   # published_state_dict_shapes.json


def test_default_parameter_count_and_published_names():
    ref = json.loads((DATA / "published_state_dict_shapes.json").read_text())
    model = LDEQ()
    assert sum(p.numel() for p in model.parameters()) == ref["parameter_count"] == 16_531_346
    sd = model.state_dict()
    assert set(sd) == set(ref["state_dict_shapes"])
    for k, shape in ref["state_dict_shapes"].items():
        assert list(sd[k].shape) == shape, k


def test_default_model_shapes_one_iteration():
    torch.manual_seed(0)
    model = LDEQ(LDEQConfig(backend="torch", max_iters=1)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.keypoints.shape == (1, 98, 2)
    assert out.uncertainty.shape == (1, 98)
    assert out.z_star.shape == (1, 98, 64, 64)
    assert ((out.keypoints >= 0) & (out.keypoints < 1)).all()


@pytest.mark.parametrize("k,extra", [(98, 0), (68, 3), (19, 0)])
def test_small_model_outputs(k, extra):
    torch.manual_seed(0)
    cfg = LDEQConfig.small(n_keypoints=k, extra_latent_width=extra, backend="torch", max_iters=3)
    model = LDEQ(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 128, 128))
    assert out.keypoints.shape == (3, k, 2)
    assert out.heatmaps.shape == (3, k, 32, 32)
    assert out.z_star.shape == (3, k + extra, 32, 32)
    assert ((out.keypoints >= 0) & (out.keypoints < 1)).all()
    assert (out.uncertainty >= 0).all()
    assert out.stats.nstep.shape == (3,)


def test_heatmaps_to_keypoints_known_values():
    from ldeq_fast.ops.heatmap import heatmap_keypoints_ref

    hm = torch.zeros(1, 2, 8, 8)
    hm[0, 0, 2, 5] = 1.0                       # a delta at row 2, column 5
    hm[0, 1, 4, 1] = hm[0, 1, 4, 3] = 1.0      # two deltas: mean column 2, spread 1 column
    k, spread, published = heatmap_keypoints_ref(hm)
    scale = 1 / (1 + 1e-4)
    assert torch.allclose(k[0, 0], torch.tensor([5 / 8, 2 / 8]) * scale, atol=1e-6)
    assert torch.allclose(k[0, 1], torch.tensor([2 / 8, 4 / 8]) * (2 / (2 + 1e-4)), atol=1e-6)
    assert spread[0, 0] < 1e-3                  # a delta has (almost) no spread
    assert abs(spread[0, 1] - (0.5 ** 0.5) / 8) < 1e-3
    # the published value measures position, not spread: large even for a delta
    assert published[0, 0] > 0.3


def test_input_checks(small_cfg):
    model = LDEQ(small_cfg).eval()
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    bad = torch.randn(1, 3, 128, 128)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(ValueError, match="z0 must have shape"):
        model(torch.randn(1, 3, 128, 128), z0=torch.zeros(1, 98, 16, 16))


def _contractive_model(cfg):
    """Shrink the cell's dependence on z so f is a contraction in z (a toy with a unique fixed point)."""
    torch.manual_seed(0)
    model = LDEQ(cfg).eval()
    with torch.no_grad():
        model.deq_layer.cell.tail.conv.weight[:, : cfg.z_width] *= 0.05
    return model


def test_explicit_and_implicit_agree_on_contractive_cell():
    cfg = LDEQConfig.small(backend="torch", rel_tol=2e-5, max_iters=40, explicit_depth=40)
    model = _contractive_model(cfg)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        imp = model(x, mode="implicit")
        exp = model(x, mode="explicit")
    assert imp.stats.converged.all()
    assert torch.allclose(imp.keypoints, exp.keypoints, atol=1e-5)
    assert torch.allclose(imp.z_star, exp.z_star, atol=1e-4)


def test_z0_warm_start_and_take_one_less_step():
    cfg = LDEQConfig.small(backend="torch", rel_tol=2e-5, max_iters=30)
    model = _contractive_model(cfg)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        cold = model(x)
        warm = model(x, z0=cold.z_star, max_iters=2)
        model.cfg = cfg.replace(take_one_less_inference_step=True)
        fewer = model(x, z0=cold.z_star, max_iters=1)
    # starting at the fixed point, the solver stops after one evaluation
    assert warm.stats.nstep.item() == 1
    assert torch.allclose(warm.keypoints, cold.keypoints, atol=1e-5)
    assert torch.allclose(fewer.keypoints, cold.keypoints, atol=1e-5)


def test_learnable_beta_is_a_parameter():
    cfg = LDEQConfig.small(learn_softargmax_beta=True, softargmax_beta=2.0, backend="torch")
    model = LDEQ(cfg)
    beta = model.deq_layer.cell.features_to_heatmaps
    assert beta.beta_raw.requires_grad
    assert torch.allclose(beta.effective_beta().flatten(), torch.full((cfg.z_width,), 2.0), atol=1e-5)


# the fast path's backends: the C++ ops on CPU, the Triton kernels on CUDA (the GPU suite runs -m gpu)
FAST_DEVICES = [pytest.param("cpu", marks=needs_cpp), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def fp32_convs():
    """Full-fp32 convolutions on CUDA (PyTorch lets cuDNN use TF32 by default): the 0.01 px comparison is
    of the fp32 paths, not of TF32 rounding."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


DEMO = REPO / "ldeq_fast" / "assets" / "demo_synthetic.pt"


@pytest.fixture(scope="module")
def demo_faces():
    from ldeq_fast.data.synthetic import SyntheticFaces

    ds = SyntheticFaces(3, size=128, seed=5)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


@pytest.mark.parametrize("device", FAST_DEVICES)
def test_fast_path_matches_reference_path(device, fp32_convs, demo_faces):
    """The shipped demo model on synthetic faces, solved to a tight tolerance: Anderson does real work
    (about ten iterations, and the answer moves ~0.15 heatmap px from the first iterate), and the fused
    solver + fused cell epilogues land where the plain PyTorch path does, to ~1e-5 px."""
    from ldeq_fast.model import load_weights

    settings = dict(rel_tol=1e-4, max_iters=30)
    ref_model = load_weights(DEMO, backend="torch", **settings).to(device)
    fast_model = load_weights(DEMO, backend="auto", **settings).to(device)
    x = demo_faces.to(device)
    with torch.no_grad():
        ref = ref_model(x)
        fast = fast_model(x)
        first = ref_model(x, max_iters=1)
    assert fast.stats.backend != "torch" and ref.stats.backend == "torch"
    blocks = [m for m in fast_model.deq_layer.cell.modules() if hasattr(m, "epilogue_backend")]
    assert blocks and all(m.epilogue_backend == "auto" for m in blocks)
    assert ref.stats.converged.all() and fast.stats.converged.all()
    assert (ref.stats.nstep >= 6).all()
    # the C++ ops round like the eager ones closely enough to stop at the same iteration; Triton's reductions
    # may cross the tolerance one iteration apart (each answer then still within the tolerance)
    steps_apart, kpt_px = (0, 1e-3) if device == "cpu" else (1, 5e-3)
    assert (fast.stats.nstep - ref.stats.nstep).abs().max() <= steps_apart
    px = ref_model.cfg.heatmap_size
    assert (first.keypoints - ref.keypoints).abs().max() * px > 0.05     # z matters: the solve moves them
    assert (fast.keypoints - ref.keypoints).abs().max() * px < kpt_px
    assert (fast.z_star - ref.z_star).abs().max() < 10 * kpt_px / px
    # training through the fused ops
    fast_model.train()
    out = fast_model(x)
    out.keypoints.sum().backward()
    assert all(p.grad is not None for p in fast_model.deq_layer.cell.parameters())


@pytest.mark.parametrize("device", FAST_DEVICES)
def test_fast_path_under_bf16_autocast_agrees_with_fp32(device, demo_faces, monkeypatch):
    """bf16 autocast (the GPU recipe) on the trained demo model: convolutions in bf16, the state fp32, and the
    keypoints within a twentieth of a heatmap pixel of fp32 on average (the GPU validation's target).  On a
    CPU without native bf16 LDEQ_FAST_ALLOW_SLOW_BF16 keeps the bf16 convolutions (slow, but two images)."""
    from ldeq_fast.model import load_weights

    monkeypatch.setenv("LDEQ_FAST_ALLOW_SLOW_BF16", "1")
    model = load_weights(DEMO, backend="auto").to(device)
    x = demo_faces[:2].to(device)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            low = model(x)
    assert low.z_star.dtype == torch.float32 and low.keypoints.dtype == torch.float32
    diff = (low.keypoints - ref.keypoints).abs() * model.cfg.heatmap_size
    assert 0 < diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())


@needs_cpp
def test_fast_cpu_inference_has_no_standalone_activation_adds(monkeypatch):
    """CPU fp32 inference with the fixed layout: every sum over activations rides on another op (the oneDNN
    conv's add post-op, the fused norm's residual), and no cell activation is re-laid out: such a pass costs a
    few percent of the forward each (the profiler sees ops that oneDNN's fallbacks call internally).  (A
    measured plan, ldeq_fast/model/cpu_tuning.py, may choose a separate add or a layout change where it timed faster.)"""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("LDEQ_FAST_CPU_TUNING", "off")

    cfg = LDEQConfig.small(backend="auto", max_iters=2)
    torch.manual_seed(0)
    model = LDEQ(cfg).eval()
    x = torch.randn(2, 3, 128, 128)
    widths = {cfg.cell_base_width + i * cfg.cell_width_increment for i in range(5)}
    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
    adds = [(e.name, e.input_shapes[0]) for e in prof.events()
            if e.name in ("aten::add", "aten::add_") and e.input_shapes and len(e.input_shapes[0]) == 4]
    relayouts = [(e.name, e.input_shapes[0]) for e in prof.events()
                 if e.name == "aten::clone" and e.input_shapes and len(e.input_shapes[0]) == 4
                 and e.input_shapes[0][1] in widths and e.input_shapes[0][0] == 2]
    assert not adds and not relayouts, (adds, relayouts)


def test_torch_compile_of_the_model_runs_on_cpu():
    # The compiled model is one more fp32 rounding order of the same function.  Random weights and 3 Anderson
    # steps amplify rounding (~1e-4 on keypoints), so the bound is the eager fp32 paths' own distance from the
    # fp64 answer: compiled may be at most 2x as far from fp64 as the worse of them, plus a few fp32 ulps.
    cfg = LDEQConfig.small(backend="auto", max_iters=3)
    torch.manual_seed(0)
    model = LDEQ(cfg).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        want = model(x).keypoints
        got = torch.compile(model)(x).keypoints
        ref = LDEQ(dataclasses.replace(cfg, backend="torch")).eval()
        ref.load_state_dict(model.state_dict())
        eager_torch = ref(x).keypoints
        exact = ref.double()(x.double()).keypoints
    fp32_err = max((want.double() - exact).abs().max(), (eager_torch.double() - exact).abs().max()).item()
    err = (got.double() - exact).abs().max().item()
    assert err <= 2 * fp32_err + 1e-6, (err, fp32_err)
