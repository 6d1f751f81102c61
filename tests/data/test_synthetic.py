"""Synthetic faces and videos: determinism, layout geometry, visible structure, speed, video properties."""

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from ldeq_fast.data.layouts import WFLW98
from ldeq_fast.data.synthetic import (
    Occluder,
    SyntheticFaceParams,
    SyntheticFaces,
    face_landmarks,
    make_video,
    render_face,
    sample_params,
)
from ldeq_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

PERM = np.array(WFLW98.flip_permutation())


def mirror(lm, width):
    out = lm.copy()
    out[:, 0] = width - 1 - out[:, 0]
    return out[PERM]


def layout_violations(lm):
    """Ordering facts of a frontal, upright WFLW-98 face; returns the list of broken ones."""
    x, y = lm[:, 0], lm[:, 1]
    checks = {
        "contour left->chin->right": np.all(np.diff(x[0:33]) > 0),
        "contour goes down to the chin": np.all(np.diff(y[0:17]) > 0) and np.all(np.diff(y[16:33]) < 0),
        "left brow upper arc outer->inner": np.all(np.diff(x[33:38]) > 0),
        "left brow lower arc inner->outer": np.all(np.diff(x[37:42]) < 0),
        "right brow upper arc inner->outer": np.all(np.diff(x[42:47]) > 0),
        "right brow lower arc outer->inner": np.all(np.diff(x[46:51]) < 0),
        "brow lower arcs below upper arcs": y[38:42].mean() > y[33:38].mean() and y[47:51].mean() > y[42:47].mean(),
        "left brow left of right brow": x[33:42].max() < x[42:51].min(),
        "eye corners 60 < 64 < 68 < 72": x[60] < x[64] < x[68] < x[72],
        "left upper lid outer->inner": np.all(np.diff(x[60:65]) > 0),
        "left lower lid inner->outer": np.all(np.diff(x[[64, 65, 66, 67, 60]]) < 0),
        "right upper lid inner->outer": np.all(np.diff(x[68:73]) > 0),
        "right lower lid outer->inner": np.all(np.diff(x[[72, 73, 74, 75, 68]]) < 0),
        "upper lids above lower lids": np.all(y[[61, 62, 63, 69, 70, 71]] <= y[[67, 66, 65, 75, 74, 73]] + 1e-6),
        "pupils inside their eyes": x[60] < x[96] < x[64] and x[68] < x[97] < x[72],
        "nose bridge top->tip": np.all(np.diff(y[51:55]) > 0),
        "nostril line left->right": np.all(np.diff(x[55:60]) > 0),
        "outer lip ring": x[76] < x[79] < x[82] and np.all(np.diff(x[76:83]) > 0) and np.all(np.diff(x[82:88]) < 0),
        "inner lip ring": np.all(np.diff(x[88:93]) > 0) and np.all(np.diff(x[[92, 93, 94, 95, 88]]) < 0),
        "upper lip above lower lip": y[79] < y[90] <= y[94] < y[85],
        "inner corners inside outer corners": x[76] < x[88] and x[92] < x[82],
        "top-to-bottom order": y[33:51].mean() < y[60:76].mean() < y[54] < y[57] < y[76:96].mean() < y[16],
    }
    return [name for name, ok in checks.items() if not ok]


def frontal(p):
    return dataclasses.replace(p, rotation=0.0, yaw=0.0)


# ------------------------------------------------------------------------------------------- images
def test_render_is_deterministic_by_params_and_seed():
    p = sample_params(np.random.default_rng((7, 3)), "hard")
    a, la = render_face(p, 96)
    b, lb = render_face(p, 96)
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    assert la.dtype == np.float32 and la.shape == (98, 2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)

    d1, d2 = SyntheticFaces(4, size=64, seed=5), SyntheticFaces(4, size=64, seed=5)
    for i in (0, 3):
        x, y = d1[i], d2[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["kpts"], y["kpts"]) and x["index"] == i
    other_seed, other_index = SyntheticFaces(4, size=64, seed=6)[0], d1[1]
    for other in (other_seed, other_index):
        assert not torch.equal(d1[0]["image"], other["image"])
        assert not torch.equal(d1[0]["kpts"], other["kpts"])


def test_dataset_items():
    ds = SyntheticFaces(3, size=48, seed=1, difficulty="hard")
    assert len(ds) == 3
    item = ds[2]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert item["kpts"].shape == (98, 2) and item["kpts"].dtype == torch.float32
    assert item["kpts"].min() >= 0 and item["kpts"].max() <= 1
    img, lm = render_face(ds.params(2), 48)
    back = item["image"].numpy().transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    np.testing.assert_allclose(back * 255, img, atol=1e-3)
    np.testing.assert_allclose(item["kpts"].numpy(), lm / 48, rtol=1e-6)
    assert ds[-1]["index"] == 2
    with pytest.raises(IndexError):
        ds[3]
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 48, 48) and batch["kpts"].shape == (2, 98, 2)


def test_landmarks_inside_image_and_match_render():
    for i in range(150):
        for difficulty in ("normal", "hard"):
            p = sample_params(np.random.default_rng((11, i)), difficulty)
            lm = face_landmarks(p, 256)
            assert np.all(lm >= 0) and np.all(lm <= 255), (difficulty, i, lm.min(0), lm.max(0))
    _, lm_rendered = render_face(p, 256)
    np.testing.assert_array_equal(lm_rendered, face_landmarks(p, 256))


def test_layout_order_and_flip_consistency():
    width = 200
    sym = SyntheticFaceParams(gaze_x=0.0, gaze_y=0.3)  # default: symmetric, frontal
    lm = face_landmarks(sym, width)
    assert layout_violations(lm) == []
    flipped = mirror(lm, width)
    assert layout_violations(flipped) == []
    # a symmetric face mirrored and re-indexed with the layout's flip pairs is the same face
    np.testing.assert_allclose(flipped, lm, atol=1e-3)

    for i in range(40):
        p = frontal(sample_params(np.random.default_rng((3, i)), "normal"))
        lm = face_landmarks(p, width)
        assert layout_violations(lm) == [], i
        assert layout_violations(mirror(lm, width)) == [], i

    # the check itself catches a wrong pair: swapping 65<->75 with 67<->73 breaks the lid order
    bad = PERM.copy()
    bad[[65, 67]] = bad[[67, 65]]
    lm = face_landmarks(sym, width)
    wrong = lm.copy()
    wrong[:, 0] = width - 1 - wrong[:, 0]
    assert layout_violations(wrong[bad]) != []


def test_landmarks_sit_on_drawn_structure():
    p = SyntheticFaceParams(blur=0.0, noise=0.0, clutter=0, texture=0.0, mouth_open=0.6,
                            skin=(200, 160, 130), hair=(40, 30, 25), lips=(200, 80, 90))
    img, lm = render_face(p, 256)

    def px(pt):
        return img[int(round(pt[1])), int(round(pt[0]))].astype(float)

    for pupil in (96, 97):
        assert px(lm[pupil]).sum() < 60, "pupil landmark not on a dark pupil"
    for brow in (slice(33, 42), slice(42, 51)):
        centre = lm[brow].mean(0)
        assert px(centre).sum() < 0.6 * sum(p.skin), "brow centroid not on the brow"
    for upper, inner in ((78, 89), (80, 91)):  # between outer and inner upper-lip points: lip colour
        np.testing.assert_allclose(px((lm[upper] + lm[inner]) / 2), p.lips, atol=25)
    mouth_inside = (lm[90] + lm[94]) / 2
    assert px(mouth_inside).sum() < 0.5 * sum(p.lips), "open mouth interior not dark"
    cheek = (lm[4] + lm[55]) / 2
    np.testing.assert_allclose(px(cheek), p.skin, atol=20)
    for corner in (60, 64, 68, 72):  # eye corners are on the dark upper-lid line
        assert px(lm[corner]).sum() < 0.7 * sum(p.skin)


def test_occluders_cover_pixels_but_not_landmarks():
    base = SyntheticFaceParams(noise=0.0)
    occ = dataclasses.replace(base, occluders=(Occluder("rect", 0.4, -0.2, 0.3, 0.25, 10.0, (0, 200, 0)),))
    a, la = render_face(base, 128)
    b, lb = render_face(occ, 128)
    np.testing.assert_array_equal(la, lb)
    x, y = np.round(lb[97]).astype(int)  # right pupil is under the occluder
    np.testing.assert_allclose(b[y, x], (0, 200, 0), atol=3)
    assert not np.array_equal(a[y, x], b[y, x])


def test_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        sample_params(np.random.default_rng(0), "easy")
    with pytest.raises(TypeError, match="Generator"):
        sample_params(0)
    with pytest.raises(ValueError, match="size"):
        render_face(SyntheticFaceParams(), 8)
    with pytest.raises(ValueError, match="yaw"):
        render_face(SyntheticFaceParams(yaw=float("nan")))
    with pytest.raises(ValueError, match="skin"):
        face_landmarks(SyntheticFaceParams(skin=(1.0, float("inf"), 3.0)))
    with pytest.raises(TypeError, match="SyntheticFaceParams"):
        render_face({"yaw": 0.0})
    with pytest.raises(ValueError, match="seed"):
        SyntheticFaces(2, seed=-1)
    with pytest.raises(ValueError, match="scene_cut"):
        make_video(0, 10, size=32, scene_cut=10)
    with pytest.raises(ValueError, match="n_frames"):
        make_video(0, 0, size=32)


# ------------------------------------------------------------------------------------------- videos
def test_video_deterministic_smooth_gt_and_jittery_boxes():
    v = make_video(1, 40, size=96)
    w = make_video(1, 40, size=96)
    assert v.frames.shape == (40, 144, 144, 3) and v.frames.dtype == np.uint8
    assert v.landmarks.shape == (40, 98, 2) and v.bboxes.shape == (40, 4)
    np.testing.assert_array_equal(v.frames, w.frames)
    np.testing.assert_array_equal(v.landmarks, w.landmarks)
    np.testing.assert_array_equal(v.bboxes, w.bboxes)
    u = make_video(2, 40, size=96)
    assert not np.array_equal(v.landmarks, u.landmarks) and not np.array_equal(v.frames, u.frames)

    assert np.all(v.landmarks >= 0) and np.all(v.landmarks <= 143)
    assert not (v.motion_blur.any() or v.low_light.any() or v.occluded.any())

    face = (v.landmarks.max(1) - v.landmarks.min(1)).max(1)  # (T,) landmark extent
    step = np.linalg.norm(np.diff(v.landmarks, axis=0), axis=2).max(1)
    assert np.all(step < 0.06 * face[1:]), step / face[1:]
    assert step.mean() > 0.002 * face.mean(), "the face does not move"

    box_c = (v.bboxes[:, :2] + v.bboxes[:, 2:]) / 2
    box_size = (v.bboxes[:, 2:] - v.bboxes[:, :2]).mean()
    gt_c = v.landmarks.mean(1)
    acc_box = np.abs(np.diff(box_c, 2, axis=0)).mean() / box_size
    acc_gt = np.abs(np.diff(gt_c, 2, axis=0)).mean() / box_size
    assert acc_box > 0.02 and acc_box > 10 * acc_gt, (acc_box, acc_gt)
    # every box still contains most of the face
    inside = ((v.landmarks >= v.bboxes[:, None, :2]) & (v.landmarks <= v.bboxes[:, None, 2:])).all(2).mean()
    assert inside > 0.9


def test_video_frames_rerender_from_params():
    v = make_video(4, 3, size=64, frame_hw=(80, 112))
    assert v.frames.shape == (3, 80, 112, 3)
    img, lm = render_face(v.params[2], (80, 112))
    np.testing.assert_array_equal(img, v.frames[2])
    np.testing.assert_array_equal(lm, v.landmarks[2])


def laplacian_energy(img):
    return float(np.abs(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32), cv2.CV_32F)).mean())


def test_hard_video_has_episodes():
    v = make_video(2, 120, size=128, difficulty="hard")
    assert v.occluded.any() and v.motion_blur.any() and v.low_light.any()
    assert not v.low_light.all() and not v.motion_blur.all()
    hw = v.frames.shape[1:3]

    dark, lit = v.frames[v.low_light].mean(), v.frames[~v.low_light].mean()
    assert dark < 0.7 * lit, (dark, lit)

    t = int(np.argmax([q.motion_blur_len for q in v.params]))
    blurred = dataclasses.replace(v.params[t], noise=0.0, blur=0.0)
    sharp = dataclasses.replace(blurred, motion_blur_len=0.0)
    assert laplacian_energy(render_face(blurred, hw)[0]) < 0.7 * laplacian_energy(render_face(sharp, hw)[0])

    t = int(np.argmax(v.occluded.sum(1)))
    clear, _ = render_face(dataclasses.replace(v.params[t], occluders=()), hw)
    k = np.flatnonzero(v.occluded[t])
    xy = np.round(v.landmarks[t, k]).astype(int)
    changed = np.abs(clear[xy[:, 1], xy[:, 0]].astype(int) - v.frames[t][xy[:, 1], xy[:, 0]]).sum(1) > 10
    assert changed.mean() > 0.8
    # the occluder slides in: coverage is partial at some frames of an episode, not all-or-nothing
    counts = v.occluded.sum(1)
    assert len(set(counts[counts > 0])) > 2


def test_scene_cut():
    n, cut = 30, 15
    v = make_video(3, n, size=64, scene_cut=cut)
    np.testing.assert_array_equal(v.shot, (np.arange(n) >= cut).astype(int))
    assert v.params[cut - 1].skin != v.params[cut].skin
    move = np.linalg.norm(np.diff(v.landmarks, axis=0), axis=2).mean(1)  # move[t-1]: frame t-1 -> t
    assert move[cut - 1] > 4 * np.delete(move, cut - 1).max()
    assert not np.array_equal(v.frames[cut - 1][:8, :8], v.frames[cut][:8, :8])  # new background
