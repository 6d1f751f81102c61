import random
import re

import numpy as np
import pytest
import torch

from ldeq_fast import LDEQConfig
from ldeq_fast.config import backward_depth, forward_depth


def test_published_defaults():
    c = LDEQConfig()
    assert (c.injection_width, c.cell_base_width, c.cell_width_increment, c.cell_gn_groups) == (224, 224, 24, 1)
    assert (c.softargmax_beta, c.n_keypoints, c.heatmap_size, c.im_size) == (1.0, 98, 64, 256)
    assert (c.solver, c.anderson_m, c.anderson_lam, c.max_iters, c.stop_mode, c.rel_tol) == (
        "anderson", 6, 1e-4, 10, "rel", 5e-3)
    assert c.z_width == 98


@pytest.mark.parametrize("k", [98, 68, 29, 19])
def test_layouts_and_extra_channels(k):
    c = LDEQConfig(n_keypoints=k, extra_latent_width=5)
    assert c.z_width == k + 5


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown config key.*'not_a_key'"):
        LDEQConfig.from_dict({"not_a_key": 1})
    with pytest.raises(TypeError):
        LDEQConfig(not_a_key=1)


@pytest.mark.parametrize("bad,match", [
    ({"n_keypoints": 97}, "n_keypoints"),
    ({"solver": "newton"}, "solver"),
    ({"cell_gn_groups": 5}, "cell_gn_groups"),
    ({"im_size": 200}, "im_size"),
    ({"stop_mode": "max"}, "stop_mode"),
])
def test_invalid_values(bad, match):
    with pytest.raises(ValueError, match=match):
        LDEQConfig.from_dict(bad)


def test_round_trip():
    c = LDEQConfig.small(max_iters=3)
    assert LDEQConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kw,msg", [
    ({"rel_tol": "5e-3"}, "LDEQConfig: rel_tol must be a float, got str '5e-3'"),
    ({"max_iters": True}, "LDEQConfig: max_iters must be an int, got bool True"),      # bool is not an int
    ({"max_iters": 10.0}, "LDEQConfig: max_iters must be an int, got float 10.0"),
    ({"stochastic_max_iters": 1}, "LDEQConfig: stochastic_max_iters must be a bool, got int 1"),  # nor an int a bool
    ({"solver": None}, "LDEQConfig: solver must be a str, got NoneType None"),
    ({"extra": [1]}, "LDEQConfig: extra must be a dict, got list [1]"),
])
def test_wrong_types_are_named_by_key(kw, msg):
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        LDEQConfig(**kw)
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        LDEQConfig.from_dict(kw)


def test_accepted_types_are_normalised():
    c = LDEQConfig(rel_tol=1, max_iters=np.int64(3), softargmax_beta=np.float32(2.0))
    assert type(c.rel_tol) is float and c.rel_tol == 1.0
    assert type(c.max_iters) is int and type(c.softargmax_beta) is float
    assert LDEQConfig.from_dict(c.to_dict()) == c


def test_train_and_tracker_configs_name_wrong_types():
    from ldeq_fast.train import TrainConfig
    from ldeq_fast.video.tracker import TrackerConfig

    with pytest.raises(TypeError, match=r"^TrainConfig: lr must be a float, got str '1e-3'$"):
        TrainConfig.from_dict({"lr": "1e-3"})
    with pytest.raises(TypeError, match=r"^TrainConfig: steps must be an int, got bool True$"):
        TrainConfig(steps=True)
    with pytest.raises(TypeError, match=r"^TrainConfig: data_root must be a str or None, got int 5$"):
        TrainConfig(data_root=5)
    with pytest.raises(TypeError, match=r"^LDEQConfig: rel_tol must be a float, got str 'x'$"):
        TrainConfig(model={"rel_tol": "x"})          # the model overrides are checked too
    assert TrainConfig(eval_splits=("test",)).eval_splits == ["test"]
    with pytest.raises(TypeError, match=r"^TrackerConfig: reset_residual must be a float or None, got str '0.1'$"):
        TrackerConfig(reset_residual="0.1")
    with pytest.raises(TypeError, match=r"^TrackerConfig: align must be a bool, got int 0$"):
        TrackerConfig(align=0)
    assert TrackerConfig(reset_residual=None, gamma=2).gamma == 2.0


def test_config_errors_are_one_class_caught_as_value_or_type_errors():
    from ldeq_fast.config import ConfigError

    for bad in ({"rel_tol": "x"}, {"max_itres": 3}, {"max_iters": 0}):
        with pytest.raises(ConfigError) as info:
            LDEQConfig.from_dict(bad)
        assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_train_config_from_a_file_and_overrides(tmp_path):
    from ldeq_fast.config import ConfigError
    from ldeq_fast.train import config_from_sources

    f = tmp_path / "c.json"
    f.write_text('{"steps": 7, "lr": 0.5, "model": {"max_iters": 3, "rel_tol": 0.01}}')
    c = config_from_sources(f, ["lr=0.25", "model.max_iters=4", "model_preset=small"], out_dir="runs/x")
    assert (c.steps, c.lr, c.model_preset, c.out_dir) == (7, 0.25, "small", "runs/x")
    assert c.model == {"max_iters": 4, "rel_tol": 0.01}          # the overrides merge into the file's model
    with pytest.raises(ConfigError, match=r"steps must be an int, got str 'abc'"):
        config_from_sources(None, ["steps=abc"])
    with pytest.raises(ConfigError, match=r"override 'steps' is not key=value"):
        config_from_sources(None, ["steps"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        config_from_sources(tmp_path / "missing.json")
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"c\.json: expected a JSON object"):
        config_from_sources(f)
    f.write_text("{steps: 1}")
    with pytest.raises(ConfigError, match=r"c\.json: not valid JSON"):
        config_from_sources(f)


# ------------------------------------------------------------------------------------------ solver depth
def test_depth_rule_is_the_published_one():
    assert [forward_depth(10, False, t) for t in (False, True)] == [10, 10]
    assert forward_depth(10, True, False) == 5 and forward_depth(1, True, False) == 1
    assert forward_depth(7, True, False) == 4                       # round(3.5): Python's banker's rounding
    random.seed(0)
    draws = [forward_depth(6, True, True) for _ in range(200)]
    assert set(draws) == set(range(1, 7))                            # 1..max_iters, drawn
    assert backward_depth(10, False) == 10 and backward_depth(10, True) == 5 and backward_depth(1, True) == 1
    assert backward_depth(10, True, backward_max_iters=3) == 3


def test_backward_depth_is_deterministic_and_shared_by_model_and_compat():
    """With stochastic_max_iters in training, the forward depth is drawn (once per forward) and the backward
    depth is fixed by the rule, in LDEQ and in compat.published.LDEQ (both semantics)."""
    from test_published_checkpoint import published_args  # tests/ is on sys.path (no package)

    from ldeq_fast import LDEQ
    from ldeq_fast.compat.published import LDEQ as PublishedLDEQ

    x = torch.randn(2, 3, 128, 128)
    cfg = LDEQConfig.small(backend="torch", max_iters=5, stochastic_max_iters=True, rel_tol=0.0, abs_tol=0.0)
    args = published_args(max_iters=5, stochastic_max_iters=True, rel_diff_target=0.0, abs_diff_target=0.0)
    torch.manual_seed(0)
    models = {"model": LDEQ(cfg).train(), "compat": PublishedLDEQ(args).train(),
              "compat fast": PublishedLDEQ(args, fast=True, backend="torch").train()}
    for name, model in models.items():
        fwd, bwd = [], []
        for seed in range(6):
            random.seed(seed)
            out = model(x) if name == "model" else model(x, args=args)
            assert random.getstate() == (random.seed(seed), random.randint(1, 5), random.getstate())[2], name
            kp = out.keypoints if name == "model" else out["keypoints"]
            model.backward_log.clear()
            kp.sum().backward()
            stats = out.stats if name == "model" else model.last_stats
            fwd.append(stats.max_iter)
            bwd.append(model.backward_log.stats[-1].max_iter)
        assert len(set(fwd)) > 1, (name, fwd)                       # the forward depth was drawn
        assert bwd == [backward_depth(5, True)] * 6 == [2] * 6, (name, bwd)
