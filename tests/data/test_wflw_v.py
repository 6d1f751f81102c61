import cv2
import numpy as np
import pytest
import torch
from test_transforms import blob_image, centroid  # tests/ is on sys.path (no package)

from ldeq_fast.data.transforms import affine_from_bbox, apply_affine
from ldeq_fast.data.wflw_v import VideoError, WFLWVideoSet, crop_frames, keypoints_to_frame, load_video

H, W, T = 72, 96, 6
# frame t is one flat colour (RGB), distinct and far apart so lossy coding cannot confuse them
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220), (128, 128, 128)]


def write_video(path, n_frames, colours=COLOURS):
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for t in range(n_frames):
        writer.write(np.full((H, W, 3), colours[t][::-1], np.uint8))   # VideoWriter takes BGR
    writer.release()


def write_annotations(root, vid, n, box_cols=5):
    rng = np.random.default_rng(0)
    (root / "landmarks").mkdir(parents=True, exist_ok=True)
    (root / "bboxes").mkdir(parents=True, exist_ok=True)
    lm = rng.uniform(20, 60, size=(n, 98, 2))
    boxes = np.concatenate([lm.min(1) - 2, lm.max(1) + 2, np.ones((n, box_cols - 4))], axis=1)
    np.save(root / "landmarks" / f"{vid}.npy", lm)
    np.save(root / "bboxes" / f"{vid}.npy", boxes)
    return lm, boxes


@pytest.fixture
def video_root(tmp_path):
    write_video(tmp_path / "videos" / "001.mp4", T)
    lm, boxes = write_annotations(tmp_path, "001", T)
    return tmp_path, lm, boxes


def test_load_video_frames_and_annotations(video_root):
    root, lm, boxes = video_root
    frames, landmarks, bboxes = load_video(root, "001")
    assert frames.shape == (T, H, W, 3) and frames.dtype == np.uint8
    assert landmarks.shape == (T, 98, 2) and landmarks.dtype == np.float32
    assert bboxes.shape == (T, 4) and bboxes.dtype == np.float32
    np.testing.assert_allclose(landmarks, lm, rtol=1e-6)
    np.testing.assert_allclose(bboxes, boxes[:, :4], rtol=1e-6)
    for t in range(T):   # RGB order, frame order
        np.testing.assert_allclose(frames[t].reshape(-1, 3).mean(0), COLOURS[t], atol=12)


def test_short_video_raises_naming_id_and_counts(video_root):
    root, _, _ = video_root
    write_annotations(root, "001", T + 2)
    with pytest.raises(VideoError, match=rf"'001': decoded {T} frames .* but {T + 2} are annotated"):
        load_video(root, "001")


def test_extra_frames_warn_and_keep_the_annotated_ones(video_root):
    root, _, _ = video_root
    write_annotations(root, "001", T - 2)
    with pytest.warns(UserWarning, match=f"more frames decode than the {T - 2} annotated"):
        frames, landmarks, _ = load_video(root, "001")
    assert frames.shape[0] == landmarks.shape[0] == T - 2


def test_corrupt_and_truncated_videos_raise(video_root):
    root, _, _ = video_root
    path = root / "videos" / "001.mp4"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])     # the index (moov) of an mp4v file is written last
    with pytest.raises(VideoError, match="'001'"):
        load_video(root, "001")
    path.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(VideoError, match="'001'.*(cannot open|decoded 0)"):
        load_video(root, "001")
    path.unlink()
    with pytest.raises(VideoError, match=r"'001': video file not found: .*001\.mp4"):
        load_video(root, "001")


def test_bad_annotations_raise(video_root):
    root, lm, boxes = video_root
    np.save(root / "landmarks" / "001.npy", lm[:, :68])
    with pytest.raises(VideoError, match=r"'001': landmarks must have shape \(T, 98, 2\), got \(6, 68, 2\)"):
        load_video(root, "001")
    np.save(root / "landmarks" / "001.npy", lm)
    np.save(root / "bboxes" / "001.npy", boxes[:-1])
    with pytest.raises(VideoError, match=f"{T} annotated landmark frames but {T - 1} bboxes"):
        load_video(root, "001")
    bad = boxes.copy()
    bad[2, 1] = np.nan
    np.save(root / "bboxes" / "001.npy", bad)
    with pytest.raises(VideoError, match="NaN"):
        load_video(root, "001")
    (root / "bboxes" / "001.npy").write_bytes(b"junk")
    with pytest.raises(VideoError, match="could not read bboxes file"):
        load_video(root, "001")
    with pytest.raises(VideoError, match=r"'002': landmarks file not found"):
        load_video(root, "002")


def test_video_set_lists_ids(tmp_path):
    split = tmp_path / "test.txt"
    split.write_text("001\n\n 002 \n003\n")
    vs = WFLWVideoSet(tmp_path, "test.txt")
    assert list(vs) == ["001", "002", "003"] and len(vs) == 3 and vs[1] == "002"
    write_video(tmp_path / "videos" / "002.mp4", 2)
    write_annotations(tmp_path, "002", 2)
    assert vs.load(1).frames.shape == (2, H, W, 3)
    split.write_text("001\n002\n001\n")
    with pytest.raises(ValueError, match=r"test\.txt:3: video id '001' repeats line 1"):
        WFLWVideoSet(tmp_path, split)
    split.write_text("001 002\n")
    with pytest.raises(ValueError, match=r"test\.txt:1: expected one video id per line"):
        WFLWVideoSet(tmp_path, split)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        WFLWVideoSet(tmp_path, "missing.txt")


def test_crop_frames_and_map_back():
    rng = np.random.default_rng(1)
    n, size = 3, 40
    centres = rng.uniform([35, 30], [60, 45], size=(n, 2))
    frames = np.stack([blob_image(H, W, [c]) for c in centres])
    boxes = np.concatenate([centres - rng.uniform(10, 20, (n, 2)), centres + rng.uniform(10, 20, (n, 2))], 1)
    crops, affines = crop_frames(frames, boxes, size=size)
    assert crops.shape == (n, size, size, 3) and crops.dtype == np.uint8 and affines.shape == (n, 2, 3)
    for t in range(n):
        np.testing.assert_allclose(affines[t], affine_from_bbox(boxes[t], 1.2, size))
        expect = apply_affine(centres[t:t + 1], affines[t])[0]
        np.testing.assert_allclose(centroid(crops[t], expect, 8), expect, atol=0.2)
    # crop-normalised predictions map back to frame pixels (numpy and torch)
    kpts = apply_affine(centres[:, None, :], affines) / size
    np.testing.assert_allclose(keypoints_to_frame(kpts, affines, size), centres[:, None, :], atol=1e-9)
    back = keypoints_to_frame(torch.from_numpy(kpts).float(), affines, size)
    torch.testing.assert_close(back, torch.from_numpy(centres[:, None, :]).float(), rtol=1e-5, atol=1e-3)


def test_crop_frames_rejects_bad_input():
    frames = np.zeros((2, 10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="T = 2 frames"):
        crop_frames(frames, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="uint8"):
        crop_frames(frames.astype(np.float32), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="frame 1: bbox has x2 < x1"):
        crop_frames(frames, np.array([[0, 0, 5, 5], [6, 0, 2, 5]], dtype=float))
