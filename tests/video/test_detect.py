import json

import cv2
import numpy as np
import pytest

from ldeq_fast import detect
from ldeq_fast.detect import (
    FaceBox,
    GivenBoxes,
    HaarDetector,
    YuNetDetector,
    load_boxes,
    make_detector,
    parse_box,
)

skdata = pytest.importorskip("skimage.data")

# astronaut.png (512x512): eye centres and mouth read off the image
EYES = [(198, 100), (250, 100)]
MOUTH = (224, 145)


def _inside(box, pts):
    return all(box.x1 < x < box.x2 and box.y1 < y < box.y2 for x, y in pts)


def test_haar_finds_the_astronauts_face():
    boxes = HaarDetector()(skdata.astronaut())
    assert len(boxes) >= 1
    b = boxes[0]
    assert _inside(b, EYES + [MOUTH]), b
    assert 80 < b.x2 - b.x1 < 150 and b.source == "haar" and b.score > 0


def test_haar_on_a_large_photo_searches_a_downscaled_copy_and_answers_in_full_pixels():
    big = np.full((3000, 4000, 3), 128, np.uint8)
    face = cv2.resize(skdata.astronaut(), (2048, 2048), interpolation=cv2.INTER_LINEAR)
    big[500:2548, 1000:3048] = face
    b = HaarDetector()(big)[0]
    assert _inside(b, [(1000 + 4 * x, 500 + 4 * y) for x, y in EYES + [MOUTH]])
    assert 4 * 80 < b.x2 - b.x1 < 4 * 150


def test_missing_haar_files_name_the_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path) + "/")
    with pytest.raises(RuntimeError, match=r"opencv-python-headless>=4.8,<5"):
        HaarDetector()


def test_yunet_errors_and_box_conversion(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        YuNetDetector(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a network")
    with pytest.raises(RuntimeError, match="cannot load it as a YuNet"):
        YuNetDetector(bad)

    class FakeNet:   # cv2.FaceDetectorYN's contract: rows x, y, w, h, 5 landmarks (10), score
        def setInputSize(self, wh):
            self.wh = wh

        def detect(self, bgr):
            assert bgr.shape[1::-1] == self.wh
            return 1, np.array([[10, 20, 30, 40] + [0] * 10 + [0.7], [50, 60, 10, 10] + [0] * 10 + [0.9]], np.float32)

    monkeypatch.setattr(cv2.FaceDetectorYN, "create", lambda *a, **k: FakeNet())
    det = YuNetDetector(bad, max_side=640)
    boxes = det(np.zeros((960, 1280, 3), np.uint8))          # searched at half size
    assert [b.score for b in boxes] == pytest.approx([0.9, 0.7])
    assert (boxes[1].x1, boxes[1].y1, boxes[1].x2, boxes[1].y2) == (20, 40, 80, 120)
    assert isinstance(make_detector(str(bad)), YuNetDetector)


def test_box_files(tmp_path):
    np.save(tmp_path / "b.npy", np.array([[0, 0, 10, 10], [np.nan] * 4, [1, 2, 3, 4]], np.float32))
    got = load_boxes(tmp_path / "b.npy")
    assert got[1] is None and got[2].tolist() == [1, 2, 3, 4]
    (tmp_path / "b.csv").write_text("frame,x1,y1,x2,y2\n0,1,2,30,40\n3,,,,\n")
    got = load_boxes(tmp_path / "b.csv")
    assert got[0].tolist() == [1, 2, 30, 40] and got[3] is None and 1 not in got
    (tmp_path / "p.csv").write_text("a.jpg,1,2,3,4\n")
    assert load_boxes(tmp_path / "p.csv")["a.jpg"].tolist() == [1, 2, 3, 4]
    (tmp_path / "b.json").write_text(json.dumps({"x.png": [1, 2, 3, 4], "y.png": None}))
    got = load_boxes(tmp_path / "b.json")
    assert got["x.png"].tolist() == [1, 2, 3, 4] and got["y.png"] is None
    (tmp_path / "bad.csv").write_text("1,2,3\n")
    with pytest.raises(ValueError, match="bad.csv:1"):
        load_boxes(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        load_boxes(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="four numbers"):
        parse_box("1,2,3")
    g = GivenBoxes(per_item={"x.png": np.array([1, 2, 3, 4.0]), "y.png": None})
    assert g.lookup("/some/dir/x.png") == [FaceBox(1, 2, 3, 4, 1.0, "given")] and g.lookup("y.png") == []


def test_make_detector_rejects_unknown_names():
    assert make_detector("none") is None
    with pytest.raises(ValueError, match="haar"):
        make_detector("viola")
    assert detect.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
