"""Landmarker on photos and videos with the shipped demo model (128x128 input, 98 landmarks)."""
import cv2
import numpy as np
import pytest
import torch

from ldeq_fast import metrics
from ldeq_fast.data.synthetic import make_video, render_face, sample_params
from ldeq_fast.landmarker import Landmarker, TrackedFrame, VideoEnd, tracker_config
from ldeq_fast.video.io import FrameReader, VideoReadError, VideoWriter

pytest.importorskip("av")


@pytest.fixture(scope="module")
def lm():
    return Landmarker("demo", device="cpu", detector="none")


def write_mp4(path, frames, fps=30.0):
    w = VideoWriter(path, fps, frames.shape[2], frames.shape[1], crf=12)
    for f in frames:
        w.write(f)
    w.close()
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three synthetic videos (ground truth kept) written as mp4: 16, 7 and 10 frames."""
    d = tmp_path_factory.mktemp("clips")
    out = []
    for seed, n in ((0, 16), (1, 7), (2, 10)):
        v = make_video(seed, n, size=128, difficulty="normal")
        out.append((write_mp4(d / f"v{seed}.mp4", v.frames), v))
    return out


def _still_faces(lm, n=6):
    rng = np.random.default_rng(5)
    imgs, gts = [], []
    for _ in range(n):
        img, gt = render_face(sample_params(rng, "normal"), 160)
        imgs.append(img)
        gts.append(gt)
    return imgs, np.stack(gts)


def _gt_box(gt, margin=0.1):
    lo, hi = gt.min(0), gt.max(0)
    pad = margin * (hi - lo)
    return np.concatenate([lo - pad, hi + pad])


def test_predict_returns_landmarks_in_the_images_own_pixels(lm):
    imgs, gts = _still_faces(lm)
    res = lm.predict(imgs, boxes=[_gt_box(g) for g in gts])
    pred = np.stack([r.landmarks for r in res])
    nme = metrics.video_nme(pred, gts)
    assert nme < 8.0
    r0 = res[0]
    assert r0.ok and r0.faces[0].box_source == "given" and r0.faces[0].iterations >= 1
    assert r0.faces[0].uncertainty.shape == (98,) and (r0.faces[0].uncertainty > 0).all()
    # the same face in a 2x larger photo: landmarks (and their uncertainty) twice as far from the origin
    big = cv2.resize(imgs[0], (320, 320), interpolation=cv2.INTER_CUBIC)
    r2 = lm.predict(big, boxes=_gt_box(gts[0] * 2 + 0.5))
    assert np.abs(r2.landmarks - (r0.landmarks * 2 + 0.5)).mean() < 1.5
    assert abs(r2.faces[0].uncertainty.mean() / r0.faces[0].uncertainty.mean() - 2) < 0.2


def test_predict_accepts_grey_rgba_and_16_bit_images(lm):
    imgs, gts = _still_faces(lm, 1)
    img, box = imgs[0], _gt_box(gts[0])
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    ref = lm.predict(np.repeat(grey[:, :, None], 3, axis=2), boxes=box).landmarks
    assert np.allclose(lm.predict(grey, boxes=box).landmarks, ref)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    assert np.allclose(lm.predict(rgba, boxes=box).landmarks, lm.predict(img, boxes=box).landmarks)
    assert np.allclose(lm.predict(img.astype(np.uint16) * 257, boxes=box).landmarks,
                       lm.predict(img, boxes=box).landmarks)


def test_bad_images_are_reported_per_image_and_the_rest_still_run(lm, tmp_path):
    imgs, gts = _still_faces(lm, 1)
    (tmp_path / "notes.png").write_text("not an image")
    haar = Landmarker(lm.model, detector="haar")
    res = haar.predict([imgs[0], tmp_path / "notes.png", np.zeros((120, 160, 3), np.uint8), tmp_path / "gone.jpg"],
                       boxes=[_gt_box(gts[0]), None, None, None])
    assert res[0].ok
    assert "notes.png: not a readable image" in res[1].error
    assert res[2].error == "image 2: no face found (haar detector)" and not res[2].faces
    assert "gone.jpg: no such file" in res[3].error
    out = lm.predict(imgs[0], boxes=[500, 500, 600, 600])
    assert not out.ok and "lies outside the 160x160 image" in out.error
    assert "no detector" in lm.predict(imgs[0]).error


def test_track_a_synthetic_mp4_from_the_first_box_matches_still_image_accuracy(lm, clips):
    path, v = clips[0]
    frames = list(lm.track(path, box=v.bboxes[0]))
    assert [f.index for f in frames] == list(range(len(v.frames)))
    assert all(isinstance(f, TrackedFrame) and f.landmarks is not None for f in frames)
    assert frames[0].box_source == "given" and {f.box_source for f in frames[1:]} == {"landmarks"}
    assert frames[0].reset and frames[1].cell_evals == 2          # prox, tuned: 2 evaluations per frame
    pred = np.stack([f.landmarks for f in frames])
    # the still-image figure: every decoded frame cropped from its ground-truth-derived box, solved from zeros
    decoded = list(FrameReader(path))
    still = np.stack([r.landmarks for r in lm.predict(decoded, boxes=list(v.bboxes))])
    nme_track, nme_still = metrics.video_nme(pred, v.landmarks), metrics.video_nme(still, v.landmarks)
    assert nme_still < 4.0
    assert nme_track < 1.25 * nme_still, (nme_track, nme_still)


def test_each_stream_gets_the_same_result_batched_as_alone(lm, clips):
    paths = [p for p, _ in clips]
    first = [v.bboxes[0] for _, v in clips]
    together = {}
    ends = []
    for ev in lm.track_many(paths, first, slots=3):
        if isinstance(ev, VideoEnd):
            ends.append(ev)
        else:
            together.setdefault(ev.video, []).append(ev)
    assert sorted(e.video for e in ends) == [0, 1, 2] and all(e.error is None for e in ends)
    for i, (p, v) in enumerate(clips):
        alone = list(lm.track(p, box=v.bboxes[0]))
        assert len(alone) == len(together[i]) == len(v.frames)
        a = np.stack([f.landmarks for f in alone])
        b = np.stack([f.landmarks for f in together[i]])
        assert np.abs(a - b).max() < 1e-3, (i, np.abs(a - b).max())    # pixels: rounding of batched convs
        assert [f.box_source for f in alone] == [f.box_source for f in together[i]]
        assert [f.reset for f in alone] == [f.reset for f in together[i]]


def test_frames_without_a_face_are_reported_and_tracking_resumes(lm, clips):
    _, v = clips[0]
    frames = v.frames.copy()
    frames[5:8] = 0                                   # the face is gone for three frames
    boxes = {0: v.bboxes[0], 5: None, 6: None, 7: None, 8: v.bboxes[8]}
    out = list(lm.track(frames, boxes=boxes))
    assert [f.landmarks is None for f in out] == [5 <= t < 8 for t in range(len(frames))]
    assert out[5].note == "no box given for this frame"
    assert out[8].reset and out[8].box_source == "given" and out[9].box_source == "landmarks"
    assert metrics.video_nme(np.stack([f.landmarks for f in out[8:]]), v.landmarks[8:]) < 5.0


def test_a_box_outside_the_frame_is_a_no_face_frame_with_its_reason(lm, clips):
    _, v = clips[1]
    out = list(lm.track(v.frames[:3], boxes={0: [1000, 1000, 1100, 1100], 1: v.bboxes[1]}))
    assert out[0].landmarks is None and "lies outside the 192x192 image" in out[0].note
    assert out[1].landmarks is not None and out[2].box_source == "landmarks"


def test_a_video_corrupt_part_way_keeps_its_frames_and_names_the_frame(lm, clips, tmp_path):
    path, v = clips[0]
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    got = []
    with pytest.raises(VideoReadError) as e:
        for f in lm.track(cut, box=v.bboxes[0]):
            got.append(f)
    assert 0 < len(got) < len(v.frames) and e.value.frame == len(got) and "cut.mp4: frame" in str(e.value)


def test_redetection_after_a_scene_cut(lm):
    v = make_video(4, 12, size=128, difficulty="normal", scene_cut=6)

    class Oracle:          # a detector that knows the ground-truth boxes; counts its calls
        name = "oracle"
        calls = []

        def __call__(self, image):
            from ldeq_fast.detect import FaceBox

            t = next(i for i in range(len(v.frames)) if np.array_equal(v.frames[i], image))
            self.calls.append(t)
            return [FaceBox(*v.bboxes[t].tolist(), 1.0, "oracle")]

    det = Oracle()
    out = list(Landmarker(lm.model, detector=det, mode="warm").track(v.frames))
    assert det.calls[0] == 0 and out[0].box_source == "oracle"
    assert out[6].reset                        # the landmarks jumped at the cut: solved cold ...
    assert 7 in det.calls and out[7].box_source == "oracle"      # ... and the face looked for again
    assert metrics.video_nme(np.stack([f.landmarks for f in out[7:]]), v.landmarks[7:]) < 6.0


def test_tracker_modes():
    assert tracker_config("prox").gamma == 0.5 and tracker_config("prox").motion == "translation"
    assert tracker_config("warm").iters == 1 and tracker_config("per_frame").mode == "per_frame"
    with pytest.raises(ValueError, match="mode"):
        tracker_config("smooth")


def test_landmarker_is_exported_lazily():
    import ldeq_fast

    assert ldeq_fast.Landmarker is Landmarker
    assert torch.get_num_threads() >= 1
