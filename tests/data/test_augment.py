import dataclasses

import numpy as np
import pytest
from test_transforms import blob_image, centroid  # tests/ is on sys.path (no package)

from ldeq_fast.data.augment import AugmentConfig, augment, blur, color_jitter, geometric_affine, occlude
from ldeq_fast.data.layouts import WFLW98, layout_for
from ldeq_fast.data.transforms import apply_affine

H, W = 45, 53   # odd, non-square


def only(**kw) -> AugmentConfig:
    return dataclasses.replace(AugmentConfig.none(), **kw)


def random_sample(seed, k=98):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    pts = rng.uniform([5, 5], [W - 6, H - 6], size=(k, 2))
    return img, pts


def test_none_config_is_identity():
    img, pts = random_sample(0)
    out, p = augment(img, pts, np.random.default_rng(0), AugmentConfig.none())
    np.testing.assert_array_equal(out, img)
    np.testing.assert_allclose(p, pts, rtol=1e-6)
    assert p.dtype == np.float32 and out.dtype == np.uint8 and out.shape == img.shape


def test_same_seed_same_result_and_seeds_differ():
    img, pts = random_sample(1)
    everything = dataclasses.replace(AugmentConfig(), flip_prob=0.5, rotate_prob=1, scale_prob=1, translate_prob=1,
                                     jitter_prob=1, blur_prob=1, occlusion_prob=1)
    for cfg in (AugmentConfig(), everything):
        a = augment(img, pts, np.random.default_rng(7), cfg)
        b = augment(img, pts, np.random.default_rng(7), cfg)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    c = augment(img, pts, np.random.default_rng(8), everything)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])


def test_flip_remaps_indices_and_mirrors_columns():
    img, pts = random_sample(2)
    out, p = augment(img, pts, np.random.default_rng(0), only(flip_prob=1.0))
    np.testing.assert_array_equal(out, img[:, ::-1])   # pixel-centre mirror: exact column reversal
    perm = WFLW98.flip_permutation()
    mirrored = np.stack([W - 1 - pts[:, 0], pts[:, 1]], axis=1)
    np.testing.assert_allclose(p, mirrored[perm], rtol=1e-6, atol=1e-5)


def test_flip_twice_is_identity():
    for k in (98, 68):
        img, pts = random_sample(3, k)
        cfg = only(flip_prob=1.0)
        once = augment(img, pts, np.random.default_rng(0), cfg)
        twice = augment(*once, np.random.default_rng(1), cfg)
        np.testing.assert_array_equal(twice[0], img)
        np.testing.assert_allclose(twice[1], pts, atol=1e-4)
        assert not np.allclose(once[1], pts)


def test_flipped_symmetric_landmarks_match():
    layout = layout_for(98)
    rng = np.random.default_rng(4)
    pts = np.empty((98, 2))
    pts[:, 0] = (W - 1) / 2.0                    # unpaired points on the mirror axis
    pts[:, 1] = rng.uniform(0, H - 1, size=98)
    for a, b in layout.flip_pairs:
        x = rng.uniform(0, W - 1)
        pts[a] = (x, pts[a, 1])
        pts[b] = (W - 1 - x, pts[a, 1])
    img = np.zeros((H, W, 3), np.uint8)
    _, p = augment(img, pts, rng, only(flip_prob=1.0))
    np.testing.assert_allclose(p, pts, atol=1e-4)


def test_geometry_moves_image_and_landmarks_together():
    cfg = only(rotate_prob=1.0, scale_prob=1.0, translate_prob=1.0, flip_prob=0.5)
    size = 97
    pts = np.array([[40.3, 45.7], [60.0, 50.0], [48.5, 30.2]] + [[48.0, 48.0]] * 95)
    img = blob_image(size, size, pts[:1], sigma=2.5)   # a blob at landmark 0 only
    for seed in range(4):   # no flip here: it would move the blob's landmark to index 32
        out, p = augment(img, pts, np.random.default_rng(seed), dataclasses.replace(cfg, flip_prob=0.0))
        np.testing.assert_allclose(centroid(out, p[0], 12), p[0], atol=0.2)
        # with a flip too, landmark 0 (contour start) is reported under its mirror index 32
        out, p = augment(img, pts, np.random.default_rng(seed), dataclasses.replace(cfg, flip_prob=1.0))
        np.testing.assert_allclose(centroid(out, p[32], 12), p[32], atol=0.2)
    # the affine itself: rotation, scale within range, no shear
    A, flipped = geometric_affine(np.random.default_rng(5), cfg, size, size)
    M = A[:, :2] * (np.array([-1.0, 1.0]) if flipped else 1.0)
    s = np.sqrt(abs(np.linalg.det(M)))
    assert 0.9 - 1e-9 <= s <= 1.1 + 1e-9
    np.testing.assert_allclose(M / s @ (M / s).T, np.eye(2), atol=1e-12)
    c = np.array([[(size - 1) / 2, (size - 1) / 2]])
    assert np.abs(apply_affine(c, A) - c).max() <= 0.05 * size + 1e-9


def test_flip_of_blob_follows_landmark():
    pts = np.zeros((98, 2)) + 20.0
    pts[96] = (10.2, 15.6)                   # left pupil; after flip it becomes the right pupil (97)
    img = blob_image(H, W, pts[96:97])
    out, p = augment(img, pts, np.random.default_rng(0), only(flip_prob=1.0))
    np.testing.assert_allclose(p[97], (W - 1 - 10.2, 15.6), atol=1e-5)
    np.testing.assert_allclose(centroid(out, p[97], 8), p[97], atol=0.05)


def test_photometric_parts():
    rng = np.random.default_rng(6)
    gray = np.full((H, W, 3), 100, np.uint8)
    cfg = only(jitter_prob=1.0, brightness=0.3, contrast=0.0, saturation=0.5)
    out = color_jitter(gray, rng, cfg)        # a gray image has no saturation: only brightness acts
    assert np.unique(out).size == 1 and 70 <= out[0, 0, 0] <= 130
    colour = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    assert not np.array_equal(color_jitter(colour, rng, cfg), colour)
    for share in (0.0, 1.0):                  # gaussian, then motion
        c = only(blur_prob=1.0, motion_blur_share=share)
        np.testing.assert_array_equal(blur(gray, rng, c), gray)   # normalised kernels keep flat images
        assert blur(colour, rng, c).astype(float).std() < colour.astype(float).std()
    occ = occlude(gray, rng, only(occlusion_prob=1.0, occlusion_size=(0.2, 0.3), occlusion_noise_share=0.0))
    ys, xs = np.nonzero((occ != gray).any(axis=2))
    assert ys.size > 0
    box = occ[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert (box == box[0, 0]).all()           # one solid rectangle of one colour
    assert 0.2 * H - 1 <= box.shape[0] <= 0.3 * H + 1 and 0.2 * W - 1 <= box.shape[1] <= 0.3 * W + 1


def test_photometric_parts_leave_landmarks_alone():
    img, pts = random_sample(9)
    cfg = only(jitter_prob=1.0, blur_prob=1.0, occlusion_prob=1.0)
    out, p = augment(img, pts, np.random.default_rng(0), cfg)
    np.testing.assert_allclose(p, pts, rtol=1e-6)
    assert not np.array_equal(out, img)


def test_bad_inputs():
    img, pts = random_sample(0)
    with pytest.raises(ValueError, match="uint8"):
        augment(img.astype(np.float32), pts, np.random.default_rng(0))
    with pytest.raises(ValueError, match="K, 2"):
        augment(img, pts[:, :1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN"):
        augment(img, np.full((98, 2), np.nan), np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        augment(img, pts, 0)
    with pytest.raises(ValueError, match="layout"):      # no flip pairs known for 5 points
        augment(img, pts[:5], np.random.default_rng(0))
    out, _ = augment(img, pts[:5], np.random.default_rng(0), dataclasses.replace(AugmentConfig(), flip_prob=0.0))
    assert out.shape == img.shape


@pytest.mark.parametrize("kw, msg", [
    (dict(flip_prob=1.5), "flip_prob"),
    (dict(scale_range=(1.1, 0.9)), "scale_range"),
    (dict(scale_range=(0.0, 1.0)), "positive"),
    (dict(max_translate=1.0), "max_translate"),
    (dict(brightness=1.0), "brightness"),
    (dict(occlusion_size=(0.5, 1.5)), "occlusion_size"),
    (dict(motion_length=(0, 3)), "motion_length"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        AugmentConfig(**kw)
