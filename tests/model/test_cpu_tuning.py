"""The CPU fast path's measured layout plan (ldeq_fast/model/cpu_tuning.py): measured once per shape, cached on
disk, switchable, recorded, only where it applies, and the same answer whatever it picks."""
import json
import warnings

import pytest
import torch
from conftest import needs_cpp

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.model import cpu_tuning

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_cpp]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_tuning.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(cpu_tuning.ENV_MODE, raising=False)
    cpu_tuning.clear_memory()
    yield tmp_path / "cpu_plans.json"
    cpu_tuning.clear_memory()


def _model(**changes):
    torch.manual_seed(0)
    return LDEQ(LDEQConfig.small(max_iters=2, **changes)).eval()


def _images(n, seed=1):
    return torch.randn(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def test_measured_once_then_cached_on_disk(cache):
    model = _model()
    with torch.no_grad():
        first = model(_images(1))
    assert first.extra["cpu_plan"]["source"] == "measured"
    data = json.loads(cache.read_text())
    (entry,) = data["plans"].values()
    assert entry["key"]["batch"] == 1 and entry["key"]["cpu"] and entry["key"]["torch"] == torch.__version__
    assert set(entry["formats"].values()) <= {"nchw", "nhwc", "winograd"} and len(entry["post_add"]) == 5
    with torch.no_grad():
        assert model(_images(1)).extra["cpu_plan"]["source"] == "measured"   # this process: kept in memory
        cpu_tuning.clear_memory()
        assert model(_images(1)).extra["cpu_plan"]["source"] == "cache"      # a new process: from disk
        three = model(_images(3))                                          # bucket 2 (2-3): a new plan
    assert three.extra["cpu_plan"]["measured_batch"] == 2 and len(json.loads(cache.read_text())["plans"]) == 2


def test_switch_off_retune_and_bad_values(cache, monkeypatch):
    model = _model()
    monkeypatch.setenv(cpu_tuning.ENV_MODE, "off")
    with torch.no_grad():
        assert "cpu_plan" not in model(_images(1)).extra
    assert not cache.exists()
    with torch.no_grad():
        monkeypatch.setenv(cpu_tuning.ENV_MODE, "auto")
        model(_images(1))
        monkeypatch.setenv(cpu_tuning.ENV_MODE, "retune")
        cpu_tuning.clear_memory()
        assert model(_images(1)).extra["cpu_plan"]["source"] == "measured"
        monkeypatch.setenv(cpu_tuning.ENV_MODE, "sometimes")
        with pytest.raises(ValueError, match=cpu_tuning.ENV_MODE):
            model(_images(1))


def test_corrupt_cache_is_reported_and_replaced(cache):
    cache.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = _model()(_images(1))
    assert out.extra["cpu_plan"]["source"] == "measured"
    assert any("unreadable CPU plan cache" in str(w.message) for w in caught)
    assert json.loads(cache.read_text())["schema"] == cpu_tuning._SCHEMA


def test_only_cpu_fp32_inference_on_the_fast_path(cache):
    x = _images(1)
    ref = _model(backend="torch")
    with torch.no_grad():
        assert "cpu_plan" not in ref(x).extra                                   # the reference path
        # published-semantics runs keep the fast cell and its plan (issue 23: only the backend decides)
        assert "cpu_plan" in _model(solver_semantics="published")(x).extra
    model = _model().train()
    out = model(x)                                                             # autograd: fixed layout
    assert "cpu_plan" not in out.extra
    out.keypoints.sum().backward()


@pytest.mark.parametrize("pattern", ["alternate", "all_nchw", "all_nhwc_no_post_add", "winograd"])
def test_any_plan_gives_the_same_answer(cache, pattern):
    model = _model()
    fixed = _model(backend="torch")
    x = _images(2)
    names = list(cpu_tuning._conv_blocks(model.deq_layer.cell))
    split = ["tail", "hourglass.downchan2", "hourglass.downchan4", "hourglass.downchan6", "hourglass.downchan8"]
    fmt = {"alternate": lambda i: "nchw" if i % 2 else "nhwc", "all_nchw": lambda i: "nchw",
           "all_nhwc_no_post_add": lambda i: "nhwc", "winograd": lambda i: "nhwc"}[pattern]
    fives = [n for n in names if model.deq_layer.cell.get_submodule(n).conv.kernel_size == (5, 5)]
    plan = cpu_tuning.CellPlan({n: "winograd" if pattern == "winograd" and n in fives else fmt(i)
                                for i, n in enumerate(names)},
                               {n: pattern != "all_nhwc_no_post_add" and i % 2 == 0 for i, n in enumerate(split)})
    key = cpu_tuning.plan_key(model, 2)
    import hashlib
    cpu_tuning._plans[hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]] = plan
    weights = {n: p.stride() for n, p in model.named_parameters()}
    with torch.no_grad():
        got, want = model(x), fixed(x)
    assert got.extra["cpu_plan"]["nchw_convs"] == sum(v == "nchw" for v in plan.formats.values())
    assert got.extra["cpu_plan"]["winograd_convs"] == (4 if pattern == "winograd" else 0)
    torch.testing.assert_close(got.keypoints, want.keypoints, atol=1e-4, rtol=0)
    assert {n: p.stride() for n, p in model.named_parameters()} == weights   # parameters never re-laid out
    # a changed parameter is picked up (the plan's weight copies follow its version)
    with torch.no_grad():
        for m in (model, fixed):
            m.deq_layer.cell.hourglass.same8.conv.weight.mul_(0.5)
        torch.testing.assert_close(model(x).keypoints, fixed(x).keypoints, atol=1e-4, rtol=0)


def test_winograd_is_the_convolution():
    from ldeq_fast.model import winograd

    torch.manual_seed(0)
    for b, c, k, h in ((1, 8, 5, 8), (3, 16, 12, 16), (2, 24, 24, 4)):
        x = torch.randn(b, c, h, h, dtype=torch.float64)
        w = torch.randn(k, c, 5, 5, dtype=torch.float64)
        bias = torch.randn(k, dtype=torch.float64)
        want = torch.nn.functional.conv2d(x, w, bias, padding=2)
        got = winograd.conv5x5(x, winograd.transform_weight(w), bias)   # float64: the algorithm itself is exact
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        got32 = winograd.conv5x5(x.float().contiguous(memory_format=torch.channels_last),
                                 winograd.transform_weight(w.float()), bias.float())
        assert float((got32 - want).abs().max() / want.abs().max()) < cpu_tuning.WINOGRAD_MAX_ERROR
    conv = torch.nn.Conv2d(4, 4, 5, padding=2)
    assert winograd.supports(conv, 16, 16) and not winograd.supports(conv, 18, 16)
    assert not winograd.supports(torch.nn.Conv2d(4, 4, 3, padding=1), 16, 16)


def test_layout_changes_are_counted():
    """Two blocks a few % faster in the other format are not worth two copies; a block much faster in it is."""
    d = (cpu_tuning.DEFAULT_FORMAT, cpu_tuning.DEFAULT_POST_ADD)
    nchw = ("nchw", True)
    order = ["a", "b", "c"]
    costs = {"a": {d: 10.0, nchw: 11.0}, "b": {d: 10.0, nchw: 9.0}, "c": {d: 10.0, nchw: 11.0}}
    pricey = {"a": 3.0, "b": 3.0, "c": 3.0}
    cheap = {"a": 0.01, "b": 0.01, "c": 0.01}
    # the heatmaps leave in NCHW: all-NCHW (31, 31.9 with the margin) beats all-NHWC (30 + their copy, 3)
    assert set(cpu_tuning._choose(order, costs, pricey, d).values()) == {nchw}
    # z enters in NCHW too: when turning it costs 2, all-NHWC pays that as well
    assert cpu_tuning._choose(["a"], {"a": {d: 10.0, nchw: 11.0}}, {"a": 0.0}, d, start_copy=2.0) == {"a": nchw}
    costs["a"][nchw] = costs["c"][nchw] = 20.0
    got = cpu_tuning._choose(order, costs, pricey, d)
    assert got == {"a": d, "b": d, "c": d}            # b's 0.7 saving < two copies of 3.0
    assert cpu_tuning._choose(order, costs, cheap, d)["b"] == nchw
    # the fixed choice wins a near tie (MARGIN)
    assert cpu_tuning._choose(["a"], {"a": {d: 10.0, nchw: 9.9}}, {"a": 0.0}, d) == {"a": d}


def test_measuring_the_plan_is_not_recorded_as_what_ran(cache):
    """The first fast forward measures its plan (candidates, a meta-device shape trace on the reference ops);
    its record still says only what the forward itself ran."""
    with torch.no_grad():
        out = _model()(_images(1))
    assert out.extra["cpu_plan"]["source"] == "measured"
    assert set(out.backends.values()) == {"cpp"}, out.backends


# ------------------------------------------------------------------------------- what a plan is keyed by
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
stepping\t: 1
flags\t\t: fpu sse2 avx fma avx2 sha_ni

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: avx512f amx_tile
"""


def test_cpu_identity_reads_the_first_processor(tmp_path):
    from ldeq_fast.machine import cpu_identity

    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    assert cpu_identity(str(f)) == {"vendor": "AuthenticAMD", "family": "25", "model": "1", "stepping": "1",
                                    "model_name": "AMD EPYC 7B13", "isa": ["avx2", "fma"]}
    assert cpu_identity(str(tmp_path / "none"))["isa"] is None      # no cpuinfo: flags unknown, not "none"


def test_plan_key_holds_the_full_cpu_identity_and_a_new_one_is_measured_again(cache, monkeypatch):
    import re

    from ldeq_fast import machine

    model = _model()
    key = cpu_tuning.plan_key(model, 1)
    assert key["cpu"] == machine.cpu_identity() and {"vendor", "family", "model", "stepping"} <= set(key["cpu"])
    assert key["threads"] == torch.get_num_threads()
    onednn = re.search(r"(?:MKL-DNN|oneDNN) v(\S+)", torch.__config__.show())
    assert key["onednn"] == (onednn.group(1) if onednn else "") and key["torch"] == torch.__version__
    with torch.no_grad():
        assert model(_images(1)).extra["cpu_plan"]["source"] == "measured"
        cpu_tuning.clear_memory()
        assert model(_images(1)).extra["cpu_plan"]["source"] == "cache"
        # the same model name on another stepping, or without AMX: not this machine's plan
        for change in ({"stepping": "99"}, {"isa": ["avx2"]}):
            other = {**machine.cpu_identity(), **change}
            monkeypatch.setattr(machine, "cpu_identity", lambda other=other: other)
            cpu_tuning.clear_memory()
            assert model(_images(1)).extra["cpu_plan"]["source"] == "measured", change
    assert len(json.loads(cache.read_text())["plans"]) == 3


def test_winograd_is_admitted_per_conv_by_its_rounding_on_a_face(cache, monkeypatch):
    model = _model()
    cell = model.deq_layer.cell
    fives = [n for n, b in cpu_tuning._conv_blocks(cell).items() if b.conv.kernel_size == (5, 5)]
    with torch.no_grad():
        faces = cpu_tuning._face_activations(model, fives)
        errors = {n: cpu_tuning._winograd_error(cell.get_submodule(n), faces[n]) for n in fives}
    cpu_tuning.apply_plan(cell, None)
    seen = {}
    judge = cpu_tuning._winograd_error

    def spy(blk, x):
        seen[next(n for n in fives if cell.get_submodule(n) is blk)] = x
        return judge(blk, x)
    monkeypatch.setattr(cpu_tuning, "_winograd_error", spy)
    # a threshold between the convs' errors: those above it are rejected, each by name, the others stay
    cut = sorted(errors.values())[len(errors) // 2]
    monkeypatch.setattr(cpu_tuning, "WINOGRAD_MAX_ERROR", cut)
    plan = cpu_tuning.measure(model, 1)
    assert set(seen) == set(fives)
    for n in fives:   # judged on the conv's input when the model sees a face, not on noise
        torch.testing.assert_close(seen[n], faces[n], rtol=0, atol=0)
    rejected = plan.timings_ms.get("rejected", {})
    assert set(rejected) == {n for n in fives if errors[n] > cut} != set()
    assert all(plan.formats[n] != "winograd" for n in rejected)
