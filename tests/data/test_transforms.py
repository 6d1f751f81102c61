import cv2
import numpy as np
import pytest
import torch

from ldeq_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    affine_from_bbox,
    affine_from_point_pairs,
    affine_from_points,
    apply_affine,
    denormalize,
    invert_affine,
    normalize_image,
    pad_crop,
    warp,
)


def blob_image(h, w, centres, sigma=2.0, channels=3):
    """uint8 image with gaussian blobs (peak 250) at sub-pixel (x, y) centres, pixel-centre convention."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w), np.float64)
    for cx, cy in centres:
        img += 250.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], channels, axis=2)


def centroid(img, near=None, radius=None):
    """Intensity-weighted centre (x, y) of channel 0, optionally within a window around ``near``."""
    g = img[..., 0].astype(np.float64) if img.ndim == 3 else img.astype(np.float64)
    yy, xx = np.mgrid[0:g.shape[0], 0:g.shape[1]]
    if near is not None:
        g = np.where((np.abs(xx - near[0]) <= radius) & (np.abs(yy - near[1]) <= radius), g, 0.0)
    s = g.sum()
    return np.array([(g * xx).sum() / s, (g * yy).sum() / s])


# --- normalisation ---------------------------------------------------------------------------------


def test_normalize_known_values_and_layout():
    img = np.zeros((3, 5, 3), np.uint8)
    img[1, 2] = (255, 0, 128)
    t = normalize_image(img)
    assert t.shape == (3, 3, 5) and t.dtype == torch.float32
    expect = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
              (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    torch.testing.assert_close(t[:, 1, 2], torch.tensor(expect, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_normalize_denormalize_round_trip_batched():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    t = normalize_image(img)
    assert t.shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(denormalize(t), img)
    np.testing.assert_array_equal(denormalize(normalize_image(img[1])), img[1])
    np.testing.assert_array_equal(denormalize(normalize_image(torch.from_numpy(img[0]))), img[0])


@pytest.mark.parametrize("bad, err, msg", [
    (np.zeros((4, 4, 3), np.float32), TypeError, "uint8"),
    (np.zeros((4, 4), np.uint8), ValueError, "H, W, 3"),
    (np.zeros((4, 4, 4), np.uint8), ValueError, "H, W, 3"),
    ([[1, 2, 3]], TypeError, "numpy array"),
])
def test_normalize_rejects_bad_input(bad, err, msg):
    with pytest.raises(err, match=msg):
        normalize_image(bad)


def test_denormalize_rejects_bad_input():
    with pytest.raises(ValueError, match="3, H, W"):
        denormalize(torch.zeros(4, 5, 5))
    with pytest.raises(TypeError, match="floating"):
        denormalize(torch.zeros(3, 5, 5, dtype=torch.uint8))


# --- affines ---------------------------------------------------------------------------------------


def test_affine_from_bbox_follows_the_wflw_v_rule():
    # rounds to (10, 21, 50, 71): w=41, h=51 -> centre (30, 46); side = 1.2 * max(40, 50) = 60
    A = affine_from_bbox([10.4, 20.6, 50.2, 70.5, 0.99])   # extra columns (score) are ignored
    s = 256 / 60
    np.testing.assert_allclose(A, [[s, 0, 128 - 30 * s], [0, s, 128 - 46 * s]], atol=1e-9)
    pts = apply_affine(np.array([[30.0, 46.0], [30.0, 16.0], [0.0, 16.0]]), A)
    np.testing.assert_allclose(pts, [[128, 128], [128, 0], [0, 0]], atol=1e-9)
    # the same three point pairs through OpenCV (float32 inside)
    ref = cv2.getAffineTransform(np.float32([[30, 46], [30, 16], [0, 16]]), np.float32([[128, 128], [128, 0], [0, 0]]))
    np.testing.assert_allclose(A, ref, rtol=1e-5, atol=1e-4)


def test_affine_from_bbox_rounding_and_size():
    # int(v + 0.5) truncates toward zero: -1.2 -> int(-0.7) = 0; (0, 0, 9, 19): w=10, h=20, centre (5, 10)
    A = affine_from_bbox(np.array([-1.2, -0.9, 9.3, 18.7]), extra_scale=1.0, size=100)
    np.testing.assert_allclose(apply_affine(np.array([[5.0, 10.0]]), A), [[50.0, 50.0]], atol=1e-9)
    np.testing.assert_allclose(A[0, 0], 100 / 19, rtol=1e-12)


@pytest.mark.parametrize("bad, msg", [
    ([1.0, 2.0, 3.0], ">= 4 values"),
    ([0.0, 0.0, np.nan, 5.0], "NaN"),
    ([10.0, 0.0, 2.0, 5.0], "x2 < x1"),
    ([3.0, 3.0, 3.2, 3.1], "degenerate"),
])
def test_affine_from_bbox_rejects_bad_boxes(bad, msg):
    with pytest.raises(ValueError, match=msg):
        affine_from_bbox(bad)


def test_affine_from_points_extent_and_bbox_union():
    pts = np.array([[100.0, 50.0], [200.0, 130.0], [150.0, 90.0]])
    A = affine_from_points(pts, size=256)       # extent 100 x 80 -> side 120 around (150, 90)
    s = 256 / 120
    np.testing.assert_allclose(A, [[s, 0, 128 - 150 * s], [0, s, 128 - 90 * s]], atol=1e-9)
    # a box reaching further left widens the extent: x in [40, 200], side 192 around (120, 90)
    A2 = affine_from_points(pts, bbox=[40.0, 60.0, 180.0, 120.0], scale=1.2, size=256)
    s2 = 256 / 192
    np.testing.assert_allclose(A2, [[s2, 0, 128 - 120 * s2], [0, s2, 128 - 90 * s2]], atol=1e-9)
    crop = apply_affine(pts, A2) / 256
    assert (crop > 0.08).all() and (crop < 0.92).all()


def test_affine_from_points_rejects_bad_input():
    with pytest.raises(ValueError, match="K, 2"):
        affine_from_points(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        affine_from_points(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="zero extent"):
        affine_from_points(np.ones((4, 2)))
    with pytest.raises(ValueError, match="max >= min"):
        affine_from_points(np.eye(2), bbox=[5, 5, 1, 1])


def test_affine_from_point_pairs_collinear():
    with pytest.raises(ValueError, match="collinear"):
        affine_from_point_pairs([[0, 0], [1, 1], [2, 2]], [[0, 0], [1, 0], [0, 1]])


def random_affine(rng):
    M = rng.normal(size=(2, 2)) + 2 * np.eye(2)
    return np.concatenate([M, rng.normal(scale=50, size=(2, 1))], axis=1)


def test_apply_affine_inverse_round_trip_numpy_and_torch():
    rng = np.random.default_rng(1)
    A = random_affine(rng)
    pts = rng.uniform(-100, 400, size=(7, 2))
    np.testing.assert_allclose(apply_affine(apply_affine(pts, A), A, inverse=True), pts, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(apply_affine(pts, A), pts @ A[:, :2].T + A[:, 2], rtol=1e-12)
    # batched: one affine per frame
    As = np.stack([random_affine(rng) for _ in range(3)])
    P = rng.uniform(0, 256, size=(3, 5, 2))
    out = apply_affine(P, As)
    for t in range(3):
        np.testing.assert_allclose(out[t], apply_affine(P[t], As[t]), rtol=1e-12)
    np.testing.assert_allclose(apply_affine(out, As, inverse=True), P, rtol=1e-12, atol=1e-9)
    # torch keeps the points' dtype and matches numpy
    Pt = torch.from_numpy(P).float()
    out_t = apply_affine(Pt, As)
    assert out_t.dtype == torch.float32
    torch.testing.assert_close(out_t, torch.from_numpy(out).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(apply_affine(torch.from_numpy(out), torch.from_numpy(As), inverse=True),
                               torch.from_numpy(P), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(invert_affine(invert_affine(A)), A, rtol=1e-12, atol=1e-12)


def test_apply_affine_rejects_bad_input():
    A = np.eye(2, 3)
    with pytest.raises(ValueError, match="K, 2"):
        apply_affine(np.zeros((4, 3)), A)
    with pytest.raises(ValueError, match="NaN"):
        apply_affine(np.array([[np.nan, 1.0]]), A)
    with pytest.raises(ValueError, match="NaN"):
        apply_affine(torch.tensor([[np.inf, 1.0]]), A)
    with pytest.raises(ValueError, match="2, 3"):
        apply_affine(np.zeros((4, 2)), np.eye(3))
    with pytest.raises(ValueError, match="singular"):
        apply_affine(np.zeros((4, 2)), np.zeros((2, 3)), inverse=True)


# --- warps -----------------------------------------------------------------------------------------


def test_crop_of_known_point_lands_where_apply_affine_says():
    point = (57.3, 41.6)
    img = blob_image(90, 121, [point])
    A = affine_from_bbox([30.0, 20.0, 85.0, 70.0], size=64)
    crop = warp(img, A, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    expect = apply_affine(np.array([point]), A)[0]
    np.testing.assert_allclose(centroid(crop), expect, atol=0.15)
    # rotated and anisotropic affine, non-square output
    theta = np.deg2rad(25)
    R = 1.3 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    B = np.concatenate([R, np.array([[-10.0], [-40.0]])], axis=1)
    out = warp(img, B, (70, 95))
    assert out.shape == (70, 95, 3)
    np.testing.assert_allclose(centroid(out), apply_affine(np.array([point]), B)[0], atol=0.15)


def test_warp_border_is_zero_and_channels_kept():
    img = np.full((10, 12), 200, np.uint8)
    A = np.array([[1.0, 0.0, 20.0], [0.0, 1.0, 0.0]])    # shifts the image out to the right
    out = warp(img, A, (10, 40))
    assert out.shape == (10, 40)
    assert (out[:, :19] == 0).all() and (out[:, 21:31] == 200).all() and (out[:, 33:] == 0).all()
    one = warp(img[:, :, None], A, (10, 40))
    assert one.shape == (10, 40, 1)
    f = warp(img.astype(np.float32)[:, :, None].repeat(3, 2), np.eye(2, 3), 8)
    assert f.dtype == np.float32 and f.shape == (8, 8, 3)


@pytest.mark.parametrize("image, A, size, err, msg", [
    (np.zeros((4, 4, 3), np.int32), np.eye(2, 3), 4, TypeError, "uint8 or float32"),
    (np.zeros((4, 4, 2), np.uint8), np.eye(2, 3), 4, ValueError, "C in 1/3/4"),
    (np.zeros((4, 4, 3), np.uint8), np.eye(3), 4, ValueError, "2, 3"),
    (np.zeros((4, 4, 3), np.uint8), np.full((2, 3), np.nan), 4, ValueError, "NaN"),
    (np.zeros((4, 4, 3), np.uint8), np.eye(2, 3), 0, ValueError, "positive int"),
    (np.zeros((4, 4, 3), np.uint8), np.eye(2, 3), (4, 4, 4), ValueError, "height, width"),
])
def test_warp_rejects_bad_input(image, A, size, err, msg):
    with pytest.raises(err, match=msg):
        warp(image, A, size)


# --- published overflow rule ------------------------------------------------------------------------


def test_pad_crop_no_overflow_only_clips():
    img = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    k = np.array([[0.5, 0.5], [1 + 0.4 / 64, 0.2], [0.1, -0.3 / 64]])   # < half a pixel outside
    out, kk = pad_crop(img, k)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_allclose(kk, np.clip(k, 0, 1), atol=1e-7)
    assert kk.dtype == np.float32


def test_pad_crop_overflow_pads_resizes_and_maps_landmarks():
    S = 64
    inside = np.array([20.3, 37.8])        # a landmark with a blob drawn at it
    k = np.array([inside / S, [1 + 0.6 / S, 0.5], [0.3, -10.2 / S]])
    img = blob_image(S, S, [inside])
    out, kk = pad_crop(img, k)
    assert out.shape == img.shape and out.dtype == np.uint8
    # right overflow 0.6 px -> pad 9; top overflow 10.2 px -> pad 19; left/bottom none
    sx, sy = S / (S + 9), S / (S + 19)
    px = k * S
    expect = np.stack([(px[:, 0] + 0.5) * sx - 0.5, (px[:, 1] + 19 + 0.5) * sy - 0.5], axis=1) / S
    np.testing.assert_allclose(kk, expect, atol=1e-6)
    np.testing.assert_allclose(centroid(out, kk[0] * S, 10), kk[0] * S, atol=0.2)
    assert (out[:12] == 0).all()           # the zero border added at the top (19 px -> ~14 px after resizing)
    assert ((kk >= 0) & (kk <= 1)).all()


def test_pad_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="K, 2"):
        pad_crop(np.zeros((8, 8, 3), np.uint8), np.zeros((98,)))
    with pytest.raises(ValueError, match="NaN"):
        pad_crop(np.zeros((8, 8, 3), np.uint8), np.full((2, 2), np.nan))
    with pytest.raises(TypeError, match="uint8"):
        pad_crop(np.zeros((8, 8, 3), np.float32), np.zeros((2, 2)))
