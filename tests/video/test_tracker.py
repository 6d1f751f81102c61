import contextlib

import pytest
import torch
from conftest import needs_cpp

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.video.streams import run_streams
from ldeq_fast.video.tracker import RwRTracker, TrackerConfig

# the reference path and the fast one (backend 'auto': the fused C++ ops on CPU)
BACKENDS = ["torch", pytest.param("auto", marks=needs_cpp)]


def _toy(backend: str) -> LDEQ:
    """A small LDEQ whose cell is contractive in z and strongly driven by the image."""
    torch.manual_seed(0)
    m = LDEQ(LDEQConfig.small(backend=backend, max_iters=6, injection_width=16, cell_base_width=16,
                              cell_width_increment=4)).eval()
    with torch.no_grad():
        m.deq_layer.cell.tail.conv.weight[:, :98] *= 0.05
        m.deq_layer.cell.tail.conv.weight[:, 98:] *= 4
    return m


@pytest.fixture(scope="module")
def toy_model():
    return _toy("torch")


@pytest.fixture(scope="module", params=BACKENDS)
def backend_model(request):
    return _toy(request.param)


@pytest.mark.parametrize("mode", ["per_frame", "warm", "prox"])
def test_stream_alone_equals_stream_in_batch(backend_model, mode):
    toy_model = backend_model
    frames = torch.randn(3, 4, 3, 128, 128)
    batched = RwRTracker(toy_model, TrackerConfig(mode=mode))
    alone = RwRTracker(toy_model, TrackerConfig(mode=mode))
    for t in range(4):
        rb = batched.step(frames[:, t], ["a", "b", "c"])
        ra = alone.step(frames[1:2, t], ["b"])
        assert torch.allclose(rb.keypoints[1], ra.keypoints[0], atol=1e-5)
        assert rb.cell_evals[1] == ra.cell_evals[0]
        assert rb.reset[1] == ra.reset[0]


def test_warm_mode_spends_two_cell_evaluations_after_the_first_frame(toy_model):
    tr = RwRTracker(toy_model, TrackerConfig(mode="warm", iters=1))
    img = torch.randn(2, 3, 128, 128)
    first = tr.step(img, [0, 1])
    assert first.reset.all() and (first.cell_evals > 2).all()
    for _ in range(3):
        r = tr.step(img + 0.01 * torch.randn_like(img), [0, 1])
        assert (r.cell_evals == 2).all() and not r.reset.any()


@pytest.mark.parametrize("rule", [{"reset_residual": 0.05, "reset_displacement": None},
                                  {"reset_residual": None, "reset_displacement": 0.02}])
def test_reset_on_scene_cut(toy_model, rule):
    a = torch.randn(1, 3, 128, 128)
    b = -a.flip(-1)                                 # a different scene
    tr = RwRTracker(toy_model, TrackerConfig(mode="warm", **rule))
    resets = [bool(tr.step(img, ["s"]).reset) for img in (a, a, a, b, b)]
    assert resets == [True, False, False, True, False]
    cold = RwRTracker(toy_model, TrackerConfig(mode="per_frame")).step(b, ["s"])
    tr.reset()
    for img in (a, b):
        after_cut = tr.step(img, ["s"])
    assert torch.allclose(after_cut.keypoints, cold.keypoints, atol=1e-5)


def test_prox_gamma_zero_is_a_plain_solve_and_large_gamma_holds_still(toy_model):
    a, b = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)
    held = RwRTracker(toy_model, TrackerConfig(mode="prox", gamma=100.0, reset_residual=None,
                                               reset_displacement=None))
    k_a = held.step(a, ["s"]).keypoints
    k_b = held.step(b, ["s"]).keypoints
    free = RwRTracker(toy_model, TrackerConfig(mode="prox", gamma=0.0, prox_tol=1e-5, prox_max_iters=30,
                                               reset_residual=None, reset_displacement=None))
    free.step(a, ["s"])
    k_free = free.step(b, ["s"]).keypoints
    with torch.no_grad():
        model = toy_model
        saved = model.cfg
        model.cfg = saved.replace(rel_tol=1e-5, max_iters=30)
        k_direct = model(b).keypoints
        model.cfg = saved
    assert torch.allclose(k_free, k_direct, atol=1e-4)
    assert (k_b - k_a).abs().max() < 0.2 * (k_free - k_a).abs().max()


def test_run_streams_refills_slots(toy_model):
    lengths = (3, 5, 1, 4, 2)
    videos = [list(torch.randn(n, 3, 128, 128)) for n in lengths]
    tr = RwRTracker(toy_model, TrackerConfig(mode="warm"))
    out = run_streams(tr, videos, slots=2)
    assert [k.shape[0] for k in out["keypoints"]] == list(lengths)
    assert out["frames"] == sum(lengths)
    assert out["steps"] < sum(lengths)              # frames of different videos shared forwards
    # the same video alone gives the same landmarks
    solo = run_streams(RwRTracker(toy_model, TrackerConfig(mode="warm")), [videos[3]], slots=1)
    assert abs(solo["keypoints"][0] - out["keypoints"][3]).max() < 1e-5
    assert all(r[0] for r in out["resets"])          # each video starts cold in its slot


def test_bad_inputs(toy_model):
    tr = RwRTracker(toy_model)
    with pytest.raises(ValueError, match="len\\(streams\\)"):
        tr.step(torch.randn(2, 3, 128, 128), ["a"])
    with pytest.raises(ValueError, match="unique"):
        tr.step(torch.randn(2, 3, 128, 128), ["a", "a"])
    with pytest.raises(ValueError, match="mode"):
        TrackerConfig(mode="sticky")


def test_align_state_moves_a_peak_with_the_crop():
    from ldeq_fast.video.tracker import align_state

    z = torch.zeros(1, 1, 32, 32)
    z[0, 0, 10, 12] = 1.0                                        # row 10, column 12
    # the current crop is the previous one shifted by (+3, -2) heatmap px at crop size 128 (4 px per index)
    prev_to_now = torch.tensor([[[1.0, 0.0, -3 * 4.0], [0.0, 1.0, 2 * 4.0]]], dtype=torch.float64)
    out = align_state(z, prev_to_now, 128)
    assert out[0, 0].argmax().item() == (10 + 2) * 32 + (12 - 3)
    torch.testing.assert_close(out.sum(), z.sum())
    same = align_state(z, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64), 128)
    torch.testing.assert_close(same, z)


def test_aligned_tracker_is_batch_invariant_and_checks_affines(backend_model):
    toy_model = backend_model
    frames = torch.randn(2, 3, 3, 128, 128)
    aff = torch.eye(2, 3, dtype=torch.float64).repeat(2, 3, 1, 1)
    aff[:, :, :, 2] += torch.randn(2, 3, 2, dtype=torch.float64) * 3      # box jitter
    batched = RwRTracker(toy_model, TrackerConfig(mode="warm"))
    alone = RwRTracker(toy_model, TrackerConfig(mode="warm"))
    plain = RwRTracker(toy_model, TrackerConfig(mode="warm", align=False))
    for t in range(3):
        rb = batched.step(frames[:, t], ["a", "b"], aff[:, t])
        ra = alone.step(frames[1:2, t], ["b"], aff[1:2, t])
        rp = plain.step(frames[1:2, t], ["b"], aff[1:2, t])
        assert torch.allclose(rb.keypoints[1], ra.keypoints[0], atol=1e-5)
    assert not torch.allclose(ra.keypoints, rp.keypoints, atol=1e-5)   # the alignment changed the warm start
    with pytest.raises(ValueError, match="affines"):
        batched.step(frames[:, 0], ["a", "b"], aff[:1, 0])
    with pytest.raises(ValueError, match="more frames than"):
        run_streams(RwRTracker(toy_model), [list(frames[0])], affines=[aff[0, :2]])


def test_fit_motion_recovers_a_similarity_and_a_translation():
    from ldeq_fast.video.tracker import fit_motion

    src = torch.randn(20, 2, dtype=torch.float64) * 30
    ang, scale, t = 0.1, 1.05, torch.tensor([3.0, -2.0], dtype=torch.float64)
    rot = scale * torch.tensor([[torch.cos(torch.tensor(ang)), -torch.sin(torch.tensor(ang))],
                                [torch.sin(torch.tensor(ang)), torch.cos(torch.tensor(ang))]], dtype=torch.float64)
    dst = src @ rot.T + t
    M = fit_motion(src, dst, "similarity")
    torch.testing.assert_close(M[:, :2], rot)
    torch.testing.assert_close(src @ M[:, :2].T + M[:, 2], dst)
    T = fit_motion(src, src + t, "translation")
    torch.testing.assert_close(T, torch.cat((torch.eye(2, dtype=torch.float64), t[:, None]), 1))


@pytest.mark.parametrize("mode", ["warm", "prox"])
def test_motion_predicted_tracker_is_batch_invariant(backend_model, mode):
    toy_model = backend_model
    frames = torch.randn(2, 4, 3, 128, 128)
    aff = torch.eye(2, 3, dtype=torch.float64).repeat(2, 4, 1, 1)
    aff[:, :, :, 2] += torch.randn(2, 4, 2, dtype=torch.float64) * 3
    cfg = TrackerConfig(mode=mode, motion="similarity", reset_displacement=None)
    batched, alone = RwRTracker(toy_model, cfg), RwRTracker(toy_model, cfg)
    for t in range(4):
        rb = batched.step(frames[:, t], ["a", "b"], aff[:, t])
        ra = alone.step(frames[1:2, t], ["b"], aff[1:2, t])
        assert torch.allclose(rb.keypoints[1], ra.keypoints[0], atol=1e-5)
    assert alone.state["b"].motion is not None
    with pytest.raises(ValueError, match="motion"):
        TrackerConfig(motion="spline")


# ------------------------------------------------------------------------------------- diverged solves
@contextlib.contextmanager
def poisoned(model, image, until_cold=False):
    """The model's cell returns NaN for the samples whose injection is ``image``'s (one stream's frame):
    every evaluation, or with ``until_cold`` only until that stream is solved from zeros."""
    cell = model.deq_layer.cell
    with torch.no_grad():
        target = model.injection(image[None]).flatten(1)
    state = {"armed": True}
    original = cell.forward

    def forward(z, injection, *rest):
        out = original(z, injection, *rest)
        hit = (injection.flatten(1) - target).abs().amax(1) < 1e-3
        if until_cold and bool((hit & (z.flatten(1).abs().amax(1) == 0)).any()):
            state["armed"] = False
        if state["armed"] and bool(hit.any()):
            out = out.clone()
            out[hit] = float("nan")
        return out

    cell.forward = forward
    try:
        yield
    finally:
        del cell.forward


@pytest.mark.parametrize("mode", ["warm", "prox"])
def test_a_stream_whose_warm_solve_diverges_is_reset(backend_model, mode):
    m = backend_model
    torch.manual_seed(3)
    frames = torch.randn(2, 2, 3, 128, 128)
    cfg = TrackerConfig(mode=mode, reset_residual=None, reset_displacement=None)   # divergence is the only rule
    tracker, clean = RwRTracker(m, cfg), RwRTracker(m, cfg)
    tracker.step(frames[:, 0], ["a", "b"])
    clean.step(frames[:, 0], ["a", "b"])
    with poisoned(m, frames[1, 1], until_cold=True):
        got = tracker.step(frames[:, 1], ["a", "b"])
    assert got.reset.tolist() == [False, True] and not got.diverged.any()
    cold = RwRTracker(m, TrackerConfig(mode="per_frame")).step(frames[1:2, 1], ["b"])
    assert torch.allclose(got.keypoints[1], cold.keypoints[0], atol=1e-5)   # b was re-solved cold
    assert got.cell_evals[1] > cold.cell_evals[0]                           # after the failed warm solve
    assert torch.isfinite(tracker.state["b"].z).all()
    want = clean.step(frames[:, 1], ["a", "b"])                             # a is untouched by b's trouble
    assert torch.equal(got.keypoints[0], want.keypoints[0]) and got.cell_evals[0] == want.cell_evals[0]


def test_a_stream_whose_cold_solve_diverges_is_reported_and_keeps_no_state(backend_model):
    m = backend_model
    torch.manual_seed(4)
    frames = torch.randn(2, 2, 3, 128, 128)
    tracker = RwRTracker(m, TrackerConfig(mode="warm"))
    with poisoned(m, frames[1, 0]):
        first = tracker.step(frames[:, 0], ["a", "b"])
    assert first.diverged.tolist() == [False, True] and first.reset.all()
    assert "b" not in tracker.state and torch.isfinite(tracker.state["a"].z).all()
    second = tracker.step(frames[:, 1], ["a", "b"])
    assert second.reset.tolist() == [False, True] and not second.diverged.any()   # b starts cold again
    assert torch.isfinite(second.keypoints).all()
