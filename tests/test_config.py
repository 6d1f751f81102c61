import pytest

from ldeq_fast import LDEQConfig


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
