import argparse
import os

import pytest
import torch

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.model.published import (
    CheckpointError,
    load_published,
    published_args_to_config,
    save_published,
)


def published_args(**over):
    """An args namespace as the published training code wrote it (training-only fields included)."""
    a = dict(landmark_model_name="ldeq", cell_name="Cell0", model_mode="implicit", explicit_depth=2,
             injection_width=32, cell_base_width=32, cell_width_increment=8, cell_gn_groups=1,
             cell_use_bn_for_explicit=False, cell_norm="softargmax", cell_softargmax_beta=1.0,
             cell_learn_softargmax_beta=False, n_keypoints=98, cell_extra_latent_width=0, z_width=98,
             heatmap_size=32, im_size=128, z0_mode="zeros", solver="anderson", stop_mode="rel",
             abs_diff_target=5e-3, rel_diff_target=5e-3, anderson_m=6, anderson_lam=1e-4, anderson_beta=1.0,
             max_iters=3, stochastic_max_iters=False, take_one_less_inference_step=False, JFB=False,
             verbose_solver=False, lr=1e-3, epochs=60, seed=0)
    a.update(over)
    return argparse.Namespace(**a)


def write_published(path, args, seed=0):
    """Random weights in the published naming scheme, saved as the published code saved them."""
    torch.manual_seed(seed)
    model = LDEQ(published_args_to_config(args))
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in sd.items()}
    torch.save({"args": args, "state_dict": sd}, path)
    return sd


def test_round_trip_loads_strictly(tmp_path):
    path = tmp_path / "final.pth.tar"
    sd = write_published(path, published_args())
    model = load_published(path, backend="torch")
    assert not model.training
    assert model.cfg.injection_width == 32 and model.cfg.max_iters == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128))
    assert out.keypoints.shape == (2, 98, 2)


def test_save_published_round_trip(tmp_path):
    model = LDEQ(LDEQConfig.small(n_keypoints=68, max_iters=4))
    save_published(model, tmp_path / "m.pth")
    again = load_published(tmp_path / "m.pth")
    assert again.cfg.n_keypoints == 68 and again.cfg.max_iters == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = tmp_path / "bad.pth"
    args = published_args()
    sd = write_published(path, args)
    sd.pop("deq_layer.cell.hourglass.same3.conv.bias")
    sd["deq_layer.cell.extra.weight"] = torch.zeros(3)
    torch.save({"args": args, "state_dict": sd}, path)
    with pytest.raises(CheckpointError) as ei:
        load_published(path)
    msg = str(ei.value)
    assert "deq_layer.cell.hourglass.same3.conv.bias" in msg and "deq_layer.cell.extra.weight" in msg


def test_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "bad.pth"
    sd = write_published(path, published_args())
    torch.save({"args": published_args(cell_width_increment=16), "state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="shape mismatches.*upchan1"):
        load_published(path)


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"args": published_args(), "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="allow-list"):
        load_published(path)
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "trunc.pth"
    write_published(path, published_args())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_published(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_published(tmp_path / "nope.pth")
    torch.save({"weights": {}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="'args' and 'state_dict'"):
        load_published(tmp_path / "odd.pth")


def test_nan_weights_are_refused(tmp_path):
    path = tmp_path / "nan.pth"
    args = published_args()
    sd = write_published(path, args)
    sd["deq_layer.cell.head.conv.bias"][0] = float("nan")
    torch.save({"args": args, "state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="head.conv.bias contains NaN"):
        load_published(path)


def test_args_mapping():
    cfg = published_args_to_config(published_args(cell_norm="None", cell_extra_latent_width=2, z_width=100))
    assert cfg.cell_norm == "none" and cfg.z_width == 100
    with pytest.raises(CheckpointError, match="z_width"):
        published_args_to_config(published_args(z_width=99))
    with pytest.raises(CheckpointError, match="cell_name"):
        published_args_to_config(published_args(cell_name="Cell1"))
    switches = published_args_to_config(published_args(stochastic_max_iters=1, take_one_less_inference_step=0))
    assert switches.stochastic_max_iters is True and switches.take_one_less_inference_step is False  # argparse 0/1
    learned = published_args_to_config(published_args(cell_learn_softargmax_beta=True))
    assert abs(learned.softargmax_beta - 1.3132616) < 1e-6   # softplus(1): what the published model used


def test_a_training_checkpoint_is_not_a_published_one(tmp_path):
    from test_train import cfg, write_wflw_cropped  # tests/ is on sys.path (no package)

    from ldeq_fast.train import Trainer

    root = tmp_path / "wflw"
    write_wflw_cropped(root, "train", 2)
    write_wflw_cropped(root, "test", 1)
    Trainer(cfg(root, tmp_path / "run", steps=1, eval_splits=[])).fit(stop_at=1)
    with pytest.raises(CheckpointError, match=(
            r"last\.pt is an ldeq_fast training checkpoint \(last\.pt\), not a published LDEQ checkpoint: load the "
            r"run's exported model\.pt with ldeq_fast\.model\.load_weights \(written when training finishes\), or "
            r"resume training from it")):
        load_published(tmp_path / "run" / "last.pt")


def test_load_published_names_what_it_was_given(tmp_path):
    """One message naming the file's kind and what loads it, for each thing that is not a published checkpoint."""
    import onnx
    from onnx import TensorProto, helper

    from ldeq_fast.model import save_weights
    from ldeq_fast.model.init_state import InitialState, save_initial_state

    torch.manual_seed(0)
    model = LDEQ(LDEQConfig.small(backend="torch")).eval()
    c = model.cfg

    weights, cfg_json = save_weights(model, tmp_path, "model")
    with pytest.raises(CheckpointError, match=r"model\.pt is an ldeq_fast weights file .*model\.json\), not a "
                                              r"published LDEQ checkpoint: load it with ldeq_fast\.model\.load_weights"):
        load_published(weights)
    os.remove(cfg_json)
    with pytest.raises(CheckpointError, match=r"is a bare state_dict of \d+ tensors .*'tail\.0\.conv\.weight'.* "
                                              r"model\.json beside them for ldeq_fast\.model\.load_weights"):
        load_published(weights)

    init = save_initial_state(InitialState(c.injection_width, c.z_width, c.heatmap_size), tmp_path / "m.init.pt",
                              model)
    with pytest.raises(CheckpointError, match=r"m\.init\.pt is a learned initial state .*not a model\), not a "
                                              r"published LDEQ checkpoint: load the model itself"):
        load_published(init)

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, producer_name="pytorch")
    for name in ("landmarks.onnx", "landmarks.bin"):     # by its name, and by its content under another name
        onnx.save(proto, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=rf"{name} is an ONNX export of a model .*, not a published LDEQ "
                                                  r"checkpoint: run it with onnxruntime"):
            load_published(tmp_path / name)

    for obj, what in (([1, 2], r"is a list"), ({"foo": 1}, r"is a dict with keys \['foo'\]"),
                      ({"state_dict": {}}, r"is a dict with 'state_dict' but no 'args'")):
        torch.save(obj, tmp_path / "other.pt")
        with pytest.raises(CheckpointError, match=rf"other\.pt {what}.*, not a published LDEQ checkpoint: "):
            load_published(tmp_path / "other.pt")
