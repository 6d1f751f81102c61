"""The learned initial state (ldeq_fast/model/init_state.py): attached outside the state_dict, saved beside the
model and loaded with it, refused for other weights, used by the forward, the tracker's cold starts,
GraphedForward and the ONNX export; and the shipped demo init really saves cell evaluations."""
import copy
from pathlib import Path

import pytest
import torch
from conftest import REPO

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.model import load_published, load_weights, save_weights
from ldeq_fast.model.init_state import (
    InitFileError,
    init_cost_flops,
    init_path_for,
    new_initial_state,
    read_initial_state,
    save_initial_state,
)
from ldeq_fast.model.published import save_published

pytestmark = pytest.mark.usefixtures("one_thread")
ASSETS = REPO / "ldeq_fast" / "assets"


def _model(backend="auto", **changes):
    torch.manual_seed(0)
    return LDEQ(LDEQConfig.small(backend=backend, max_iters=3, **changes)).eval()


def _init(model, seed=1):
    torch.manual_seed(seed)
    h = new_initial_state(model)
    with torch.no_grad():
        for p in h.parameters():     # a non-trivial h (the fresh one's output conv is zero)
            p.add_(0.1 * torch.randn_like(p))
        h.confidence.bias.fill_(1.0)  # and a confident one (a fresh one starts next to zeros)
    return h


def _images(n=2, size=128, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_init_path_is_beside_the_model():
    assert init_path_for("runs/x/model.pt") == Path("runs/x/model.init.pt")
    assert init_path_for("/ck/final.pth.tar") == Path("/ck/final.init.pt")
    assert init_path_for("a.b.ckpt") == Path("a.b.init.pt")


def test_attached_init_is_not_in_the_state_dict_but_follows_the_model():
    model = _model()
    keys = set(model.state_dict())
    n_params = len(list(model.parameters()))
    model.set_initial_state(_init(model))
    assert set(model.state_dict()) == keys and len(list(model.parameters())) == n_params
    model.double()
    assert next(model.initial_state.parameters()).dtype == torch.float64
    model.float().train()
    assert model.initial_state.training and not model.uses_initial_state()   # training keeps zeros
    model.eval()
    assert model.uses_initial_state() and copy.deepcopy(model).initial_state is not None
    with pytest.raises(ValueError, match="sizes"):
        _model(n_keypoints=68).set_initial_state(model.initial_state)


def test_forward_starts_from_the_init_and_records_it():
    model = _model()
    x = _images()
    with torch.no_grad():
        cold = model(x)
        model.set_initial_state(_init(model))
        warm = model(x)
        z0 = model.initial_z0(model.injection(x))
        given = model(x, z0=z0)
        one = model(x[1:])
        z0_one = model.initial_z0(model.injection(x[1:]))
    assert cold.extra["z0"] == "zeros" and warm.extra["z0"] == "learned" and given.extra["z0"] == "given"
    assert not torch.allclose(cold.keypoints, warm.keypoints)
    torch.testing.assert_close(warm.keypoints, given.keypoints, atol=1e-6, rtol=0)
    # per sample: h alone to rounding; the solve's batch-size rounding grows in a random (non-contractive) cell
    torch.testing.assert_close(z0_one, z0[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(one.keypoints, warm.keypoints[1:], atol=3e-4, rtol=0)
    # heatmap-shaped: per channel one peak of the predicted confidence's height at the predicted position
    centres, confidence = model.initial_state.parts(model.injection(x))
    peak = z0.amax(dim=(2, 3))
    assert z0.dtype == torch.float32 and bool((peak <= confidence + 1e-6).all()) and bool((peak > 0.3 * confidence).all())
    kp = model.keypoints_from_heatmaps(z0)[0] * model.cfg.heatmap_size
    inside = ((centres > 3) & (centres < model.cfg.heatmap_size - 4)).all(-1)   # peaks not cut by the border
    torch.testing.assert_close(kp[inside], centres[inside], atol=2e-2, rtol=0)


def test_cost_is_a_small_fraction_of_a_cell_evaluation():
    model = _model()
    cost = init_cost_flops(model, new_initial_state(model))
    assert 0 < cost["ratio"] <= 0.15, cost
    demo = load_weights(ASSETS / "demo_synthetic.pt")
    assert demo.initial_state is not None
    assert init_cost_flops(demo)["ratio"] <= 0.15
    big = LDEQ(LDEQConfig())
    assert init_cost_flops(big, new_initial_state(big))["ratio"] <= 0.15


def test_saved_beside_the_weights_and_loaded_with_them(tmp_path):
    model = _model()
    weights, _ = save_weights(model, tmp_path, "m")
    assert load_weights(weights).initial_state is None          # nothing beside it yet
    h = _init(model)
    save_initial_state(h, init_path_for(weights), model, {"note": "test"})
    loaded = load_weights(weights)
    assert loaded.initial_state is not None and loaded.initial_state_info["note"] == "test"
    for a, b in zip(loaded.initial_state.state_dict().values(), h.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert load_weights(weights, init=None).initial_state is None
    # an explicit file, and a published checkpoint (whose strict load is unchanged)
    other = tmp_path / "elsewhere.pt"
    save_initial_state(h, other, model)
    assert load_weights(weights, init=other).initial_state is not None
    save_published(model, tmp_path / "final.pth.tar")
    assert load_published(tmp_path / "final.pth.tar").initial_state is None
    save_initial_state(h, tmp_path / "final.init.pt", model)
    assert load_published(tmp_path / "final.pth.tar").initial_state is not None


def test_bad_init_files_are_clear_errors(tmp_path):
    model = _model()
    weights, _ = save_weights(model, tmp_path, "m")
    with pytest.raises(InitFileError, match="not found"):
        load_weights(weights, init=tmp_path / "missing.pt")
    bad = tmp_path / "m.init.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(InitFileError, match="corrupt"):
        load_weights(weights)
    torch.save({"format": "something else"}, bad)
    with pytest.raises(InitFileError, match="format"):
        load_weights(weights)
    other = _model()
    with torch.no_grad():
        other.deq_layer.cell.tail.conv.weight.mul_(1.01)
    save_initial_state(_init(other), bad, other)        # fitted for other weights
    with pytest.raises(InitFileError, match="other weights"):
        load_weights(weights)
    h, _ = read_initial_state(bad, model, check_fingerprint=False)   # on request it loads anyway
    h.out.weight.data[0, 0] = float("nan")
    save_initial_state(h, bad, model)
    with pytest.raises(InitFileError, match="NaN"):
        load_weights(weights)
    small68 = _model(n_keypoints=68)
    save_initial_state(_init(small68), bad, small68)
    with pytest.raises(InitFileError, match="sizes"):
        load_weights(weights)


def test_tracker_cold_starts_use_the_init():
    from ldeq_fast.video.tracker import RwRTracker, TrackerConfig

    model = _model()
    model.set_initial_state(_init(model))
    x = _images(2)
    with torch.no_grad():
        still = model(x)
    res = RwRTracker(model, TrackerConfig(mode="warm")).step(x, ["a", "b"])
    torch.testing.assert_close(res.keypoints, still.keypoints, atol=1e-5, rtol=0)
    per_frame = RwRTracker(model, TrackerConfig(mode="per_frame")).step(x, ["a", "b"])
    torch.testing.assert_close(per_frame.keypoints, still.keypoints, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_graphed_forward_cold_start_uses_the_init(backend):
    from ldeq_fast.streaming import GraphedForward

    model = _model(backend)
    model.set_initial_state(_init(model))
    x = _images(1)
    gf = GraphedForward(model, batch=1, iters=2)
    got = gf(x)
    with torch.no_grad():
        want = model(x, solver=model.solver_settings(2, tol=0.0))
    assert got.extra["z0"] == "learned"
    torch.testing.assert_close(got.keypoints, want.keypoints, atol=1e-6, rtol=0)
    warm = gf(x, got.z_star)                           # a given z0 still wins
    assert warm.extra["z0"] == "given"


def test_onnx_export_starts_from_the_init(tmp_path):
    pytest.importorskip("onnxruntime")
    from ldeq_fast.export import export_onnx, read_metadata, verify_onnx

    model = _model("torch", solver="fpi", n_keypoints=19, heatmap_size=16, im_size=64)
    model.set_initial_state(_init(model))
    path = tmp_path / "m.onnx"
    export_onnx(model, path, iters=1, exporter="torchscript")
    assert read_metadata(path)["z0"] == "learned initial state"
    report = verify_onnx(model, path, torch.randn(2, 3, 64, 64))
    assert report["keypoints_vs_unrolled"] < 1e-4 and report["keypoints_vs_solver"] < 1e-4


def test_shipped_demo_init_saves_evaluations():
    """On held-out hard stills the shipped init brings 1 and 2 cell evaluations nearer the converged answer
    than the same evaluations from zeros (measured: 5.0 vs 7.1 and 2.1 vs 2.3, NME % against it)."""
    from ldeq_fast.accuracy import HELD_OUT_SEED, converged_keypoints, distance_to, predict, setting_for
    from ldeq_fast.fit_init import synthetic_images

    demo = load_weights(ASSETS / "demo_synthetic.pt")
    images = synthetic_images(32, demo.cfg.im_size, HELD_OUT_SEED + 1, progress=False)
    conv = converged_keypoints(demo, images, iters=30)

    def err(evals, init):
        return float(distance_to(predict(demo, images, setting_for(evals, "anderson"), init=init), conv).mean())

    assert err(1, True) < 0.85 * err(1, False)
    assert err(2, True) < err(2, False)
