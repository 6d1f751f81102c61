"""Bad model inputs get an error naming the problem; images of another float dtype are cast (documented in
LDEQ.check_inputs) and give the fp32 answer."""
import re

import pytest
import torch

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.video.tracker import RwRTracker


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LDEQ(LDEQConfig.small(backend="torch", max_iters=2, injection_width=16, cell_base_width=16,
                                 cell_width_increment=4)).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 128, 128)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_cast_to_the_model_dtype(model, images, dtype):
    given = images.to(dtype)
    with torch.no_grad():
        want = model(given.float())       # the values the cast gives: exact for fp16/bf16, rounded for fp64
        got = model(given)
    assert got.keypoints.dtype == torch.float32
    torch.testing.assert_close(got.keypoints, want.keypoints, rtol=0, atol=0)
    assert model.check_inputs(given, None).dtype == torch.float32


def test_0_255_images_are_refused(model, images):
    pixels = (images * 0.25 + 0.5).clamp(0, 1) * 255
    with pytest.raises(ValueError, match=re.escape(
            f"images have values up to {float(pixels.max()):.1f}: they look like 0-255 pixel values, but the model "
            "takes normalised images ((x / 255 - ImageNet mean) / std, in about [-2.2, 2.7]); "
            "use ldeq_fast.data.transforms.normalize_image")):
        model(pixels)
    with torch.no_grad():
        model(images * 3)                 # a strong but plausible normalisation passes


def test_nan_and_inf_are_refused_by_the_same_reduction(model, images):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = images.clone()
        x[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="^images contain NaN or inf$"):
            model(x)


def test_integer_images_name_the_normalisation(model):
    with pytest.raises(TypeError, match=re.escape(
            "images must be a floating-point tensor (normalised), got torch.uint8: convert uint8 RGB with "
            "ldeq_fast.data.transforms.normalize_image")):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model([[0.0]])


def test_images_on_another_device_are_refused_before_any_read(model, images):
    # a 'meta' tensor has no data: the check must name the device before anything reads a value
    with pytest.raises(ValueError, match=re.escape(
            "images are on device meta but the model is on cpu: move them with images.to('cpu')")):
        model(images.to("meta"))
    with pytest.raises(ValueError, match=re.escape("z0 is on device meta but the model is on cpu")):
        model(images, z0=torch.zeros(2, 98, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="images are on device meta"):
        RwRTracker(model).step(images.to("meta"), ["a", "b"])


def test_the_tracker_and_the_compat_model_cast_too(model, images):
    from test_published_checkpoint import published_args  # tests/ is on sys.path (no package)

    from ldeq_fast.compat.published import LDEQ as PublishedLDEQ

    with torch.no_grad():
        want = RwRTracker(model).step(images, ["a", "b"]).keypoints
        got = RwRTracker(model).step(images.double(), ["a", "b"]).keypoints
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        args = published_args(max_iters=2)
        torch.manual_seed(0)
        compat = PublishedLDEQ(args).eval()
        want = compat(images, args=args)["keypoints"]
        got = compat(images.double(), args=args)["keypoints"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
