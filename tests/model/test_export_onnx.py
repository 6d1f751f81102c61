"""ONNX export (ldeq_fast.export): onnxruntime against PyTorch running the same fixed iterations, metadata,
and the clear refusals."""
import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'ldeq_fast[export]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'ldeq_fast[export]')")

from ldeq_fast import LDEQ, LDEQConfig, __version__  # noqa: E402
from ldeq_fast.cli import main  # noqa: E402
from ldeq_fast.deq import SolverSettings  # noqa: E402
from ldeq_fast.export import export_onnx, read_metadata, verify_onnx  # noqa: E402

TINY = dict(n_keypoints=19, heatmap_size=16, im_size=64, solver="fpi", backend="torch")


def tiny_model(seed=0, contractive=False, **changes):
    torch.manual_seed(seed)
    model = LDEQ(LDEQConfig.small(**{**TINY, **changes})).eval()
    if contractive:  # damp the cell's dependence on z, so fixed-point residuals fall as in a trained model
        with torch.no_grad():
            model.deq_layer.cell.tail.conv.weight[:, : model.cfg.z_width] *= 0.2
    return model


def images(n, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_dynamo_export_matches_pytorch_and_records_metadata(tmp_path):
    model = tiny_model(contractive=True)
    path = tmp_path / "ldeq.onnx"
    meta = export_onnx(model, path, iters=2)  # the default exporter (torch.export based)
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    props = read_metadata(path)
    assert props == meta
    assert props["iterations"] == "2" and props["extra_step"] == "1" and props["solver"] == "fpi"
    assert props["opset"] == "18" and props["input_size"] == "64" and props["n_keypoints"] == "19"
    assert props["ldeq_fast_version"] == __version__ and props["exporter"] == "dynamo"
    report = verify_onnx(model, path, images(3))
    assert report["solver_best_is_last"]  # so the solver path must agree too
    assert report["keypoints_vs_unrolled"] < 1e-4 and report["uncertainty_vs_unrolled"] < 1e-4
    assert report["keypoints_vs_solver"] < 1e-4
    # the batch dimension is dynamic: one image works too, and matches the model's own forward
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kpts, unc = session.run(None, {"images": images(1, seed=2).numpy()})
    with torch.no_grad():
        out = model(images(1, seed=2), solver=SolverSettings(method="fpi", max_iter=2, tol=0.0, backend="torch"))
    assert kpts.shape == (1, 19, 2) and unc.shape == (1, 19)
    assert (torch.from_numpy(kpts) - out.keypoints).abs().max() < 1e-4
    assert (torch.from_numpy(unc) - out.uncertainty).abs().max() < 1e-4


@pytest.mark.parametrize("changes", [dict(model_mode="explicit", cell_use_bn_for_explicit=True, explicit_depth=2),
                                     dict(learn_softargmax_beta=True), dict(take_one_less_inference_step=True),
                                     dict(cell_norm="linear")],
                         ids=["explicit-bn", "learned-beta", "one-less-step", "linear-norm"])
def test_configurations_export(tmp_path, changes):
    model = tiny_model(**changes)
    if model.cfg.model_mode == "explicit":  # give BatchNorm non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(images(4, seed=5))
        model.eval()
    path = tmp_path / "m.onnx"
    meta = export_onnx(model, path, iters=2, exporter="torchscript", uncertainty="published")
    assert meta["extra_step"] == str(int(model.cfg.model_mode == "implicit" and not changes.get(
        "take_one_less_inference_step", False)))
    report = verify_onnx(model, path, images(2))
    assert report["keypoints_vs_unrolled"] < 1e-4 and report["uncertainty_vs_unrolled"] < 1e-4
    if model.cfg.model_mode == "explicit":  # an explicit model is its unrolled depth
        with torch.no_grad():
            ref = model(images(2), mode="explicit", max_iters=2)
        kpts, _ = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"images": images(2).numpy()})
        assert (torch.from_numpy(kpts) - ref.keypoints).abs().max() < 1e-4


def test_anderson_needs_explicit_fpi_and_bad_arguments(tmp_path):
    from ldeq_fast.compat.published import LDEQ as PublishedLDEQ
    from ldeq_fast.compat.published import load_checkpoint
    from ldeq_fast.model.published import save_published

    model = tiny_model(solver="anderson")
    with pytest.raises(ValueError, match="solver='fpi'"):
        export_onnx(model, tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="cannot be exported.*Anderson"):
        export_onnx(model, tmp_path / "a.onnx", solver="anderson")
    with pytest.raises(ValueError, match="iters must be >= 1"):
        export_onnx(model, tmp_path / "a.onnx", solver="fpi", iters=0)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", solver="fpi", opset=11)
    with pytest.raises(TypeError, match="float32"):
        export_onnx(tiny_model().double(), tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    # the published-compatible model class exports too (same modules)
    save_published(model, tmp_path / "ckpt.pth")
    ckpt = load_checkpoint(tmp_path / "ckpt.pth")
    compat = PublishedLDEQ(ckpt["args"])
    compat.load_state_dict(ckpt["state_dict"], strict=False)
    compat.eval()
    meta = export_onnx(compat, tmp_path / "c.onnx", solver="fpi", iters=1, exporter="torchscript")
    assert meta["solver"] == "fpi" and meta["iterations"] == "1"
    assert verify_onnx(compat, tmp_path / "c.onnx")["keypoints_vs_unrolled"] < 1e-4


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", "--onnx", str(out), "--small", "--iters", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ldeq-fast export: error: ") and "--solver fpi" in err and len(err.splitlines()) == 1
    assert main(["export", "--onnx", str(out), "--small", "--iters", "1", "--solver", "fpi",
                 "--exporter", "torchscript"]) == 0
    text = capsys.readouterr().out
    assert "iterations=1" in text and "keypoints_vs_unrolled" in text
    assert read_metadata(out)["n_keypoints"] == "98"
