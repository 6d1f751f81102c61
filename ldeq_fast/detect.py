"""Face detectors that work offline, behind one interface: ``detector(image_rgb) -> [FaceBox, ...]``, most
prominent face first, boxes (x1, y1, x2, y2) in the image's pixels.

* :class:`HaarDetector`: OpenCV's Haar frontal-face cascade; its weights install with the registry package
  ``opencv-python-headless`` 4.x (under ``cv2.data``; the 5.0 wheels no longer carry them).
* :class:`YuNetDetector`: a user-supplied ONNX face detector run by ``cv2.FaceDetectorYN`` (OpenCV's YuNet,
  ``face_detection_yunet_2023mar.onnx`` from the OpenCV model zoo).
* :class:`GivenBoxes`: boxes the user already has -- one box for everything, or a file with one box per
  frame / per image (:func:`load_boxes`).

Large images are searched on a copy whose longer side is ``max_side`` pixels; the boxes are scaled back.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

HAAR_PACKAGE = "opencv-python-headless>=4.8,<5"


@dataclass(frozen=True)
class FaceBox:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0
    source: str = "given"          # 'given' | 'haar' | 'yunet' | 'landmarks'

    def as_array(self) -> np.ndarray:
        return np.array([self.x1, self.y1, self.x2, self.y2], dtype=np.float64)

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


def _downscaled(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    s = max(image.shape[:2])
    if max_side is None or s <= max_side:
        return image, 1.0
    f = max_side / s
    return cv2.resize(image, (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))),
                      interpolation=cv2.INTER_AREA), f


def box_iou(a, b) -> float:
    a, b = np.asarray(a, np.float64)[:4], np.asarray(b, np.float64)[:4]
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class HaarDetector:
    """OpenCV's Haar frontal-face cascade on the equalised grey image.

    A Haar box spans about brows to mouth; it is widened by ``grow`` and moved down by ``shift_down`` of its
    side so it covers brows to chin like the boxes the published crop rule was made for.  The score is the
    number of merged neighbour detections (higher: more certain)."""

    name = "haar"

    def __init__(self, cascade: str = "haarcascade_frontalface_default.xml", scale_factor: float = 1.1,
                 min_neighbors: int = 5, min_size: int = 24, max_side: int | None = 1024, grow: float = 1.1,
                 shift_down: float = 0.08):
        path = Path(cascade)
        if not path.is_file():
            data = getattr(getattr(cv2, "data", None), "haarcascades", None)
            candidate = Path(data) / cascade if data else None
            if candidate is None or not candidate.is_file():
                raise RuntimeError(
                    f"the Haar cascade {cascade!r} is not installed: OpenCV {cv2.__version__} ships no "
                    f"cv2.data cascades. pip install \"{HAAR_PACKAGE}\" (its wheels carry them), or pass "
                    "--detector PATH.onnx (YuNet) or --box / --boxes")
            path = candidate
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load the Haar cascade {path}")
        self.path = str(path)
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self.max_side, self.grow, self.shift_down = max_side, grow, shift_down

    def __call__(self, image: np.ndarray) -> list[FaceBox]:
        small, f = _downscaled(image, self.max_side)
        grey = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        rects, neighbours = self.cascade.detectMultiScale2(grey, scaleFactor=self.scale_factor,
                                                           minNeighbors=self.min_neighbors,
                                                           minSize=(self.min_size, self.min_size))
        out = []
        for (x, y, w, h), n in zip(np.asarray(rects).reshape(-1, 4), np.asarray(neighbours).reshape(-1)):
            cx, cy = (x + w / 2) / f, (y + h / 2 + self.shift_down * h) / f
            half = self.grow * max(w, h) / 2 / f
            out.append(FaceBox(float(cx - half), float(cy - half), float(cx + half), float(cy + half), float(n),
                               self.name))
        return sorted(out, key=lambda b: (-b.score, -b.area))


class YuNetDetector:
    """A user-supplied YuNet ONNX model (``cv2.FaceDetectorYN``); score = the model's face confidence."""

    name = "yunet"

    def __init__(self, model_path, score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 50,
                 max_side: int | None = 1280):
        p = Path(model_path)
        if not p.is_file():
            raise FileNotFoundError(f"ONNX face detector not found: {p}")
        if not hasattr(cv2, "FaceDetectorYN"):
            raise RuntimeError(f"OpenCV {cv2.__version__} has no FaceDetectorYN; pip install \"{HAAR_PACKAGE}\"")
        try:
            self.net = cv2.FaceDetectorYN.create(str(p), "", (320, 320), score_threshold, nms_threshold, top_k)
        except cv2.error as exc:
            raise RuntimeError(f"{p}: OpenCV cannot load it as a YuNet face detector: {exc}") from exc
        self.path, self.max_side = str(p), max_side

    def __call__(self, image: np.ndarray) -> list[FaceBox]:
        small, f = _downscaled(image, self.max_side)
        self.net.setInputSize((small.shape[1], small.shape[0]))
        _, faces = self.net.detect(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        out = []
        for row in (np.zeros((0, 15)) if faces is None else np.asarray(faces)):
            x, y, w, h = (float(v) / f for v in row[:4])
            out.append(FaceBox(x, y, x + w, y + h, float(row[-1]), self.name))
        return sorted(out, key=lambda b: -b.score)


class GivenBoxes:
    """Boxes the user gives: ``box`` for every image / the first frame, or ``per_item`` (frame index or
    image name -> box, None for "no face there").  A detector that is asked about an item it has no box for
    finds no face."""

    name = "given"

    def __init__(self, box=None, per_item: dict | None = None):
        self.box = None if box is None else np.asarray(box, np.float64)[:4]
        self.per_item = per_item

    def lookup(self, key) -> list[FaceBox]:
        if self.per_item is not None:
            b = self.per_item.get(key)
            if b is None and isinstance(key, (str, Path)):
                b = self.per_item.get(Path(key).name, self.per_item.get(Path(key).stem))
        else:
            b = self.box
        if b is None or not np.isfinite(np.asarray(b, np.float64)).all():
            return []
        return [FaceBox(*(float(v) for v in np.asarray(b, np.float64)[:4]), 1.0, self.name)]


def parse_box(text: str) -> np.ndarray:
    """'x1,y1,x2,y2' -> array (4,)."""
    try:
        v = [float(s) for s in text.replace(" ", "").split(",")]
    except ValueError:
        v = []
    if len(v) != 4:
        raise ValueError(f"a box is 'x1,y1,x2,y2' (four numbers), got {text!r}")
    return np.asarray(v, np.float64)


def load_boxes(path) -> dict:
    """A file of boxes -> {key: box (4,) or None}.  Keys are frame indices (int) or image names (str).

    * ``.npy``: (T, >=4), row t = frame t; a NaN row = no face.
    * ``.json``: {"name or frame": [x1, y1, x2, y2] or null} or a list of boxes (frame t = entry t).
    * ``.csv`` / ``.txt``: rows ``x1,y1,x2,y2`` (row t = frame t) or ``key,x1,y1,x2,y2`` (a frame number
      or an image name); an empty box (``key,,,,``) = no face; a first row that is not numbers is a header.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"boxes file not found: {p}")
    boxes: dict = {}
    if p.suffix == ".npy":
        a = np.load(p, allow_pickle=False)
        if a.ndim != 2 or a.shape[1] < 4:
            raise ValueError(f"{p}: boxes must have shape (T, >=4), got {a.shape}")
        return {t: (None if not np.isfinite(r[:4]).all() else r[:4].astype(np.float64)) for t, r in enumerate(a)}
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        items = enumerate(data) if isinstance(data, list) else data.items()
        for k, v in items:
            key = int(k) if isinstance(k, int) or (isinstance(k, str) and k.isdigit()) else k
            boxes[key] = None if v is None else _box_values(v, f"{p}: entry {k!r}")
        return boxes
    with open(p, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    for i, r in enumerate(rows):
        r = [c.strip() for c in r]
        if len(r) == 4:
            key, vals = len(boxes), r
        elif len(r) == 5:
            key, vals = (int(r[0]) if r[0].lstrip("-").isdigit() else r[0]), r[1:]
        else:
            raise ValueError(f"{p}:{i + 1}: expected 'x1,y1,x2,y2' or 'key,x1,y1,x2,y2', got {','.join(r)!r}")
        if all(v == "" for v in vals):
            boxes[key] = None
            continue
        try:
            boxes[key] = _box_values([float(v) for v in vals], f"{p}:{i + 1}")
        except ValueError:
            if i == 0:          # a header row
                continue
            raise ValueError(f"{p}:{i + 1}: not four numbers: {','.join(r)!r}") from None
    return boxes


def _box_values(v, where: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.shape[0] < 4:
        raise ValueError(f"{where}: a box needs 4 values (x1, y1, x2, y2), got {a.tolist()}")
    return a[:4]


def make_detector(spec):
    """'haar' | 'none' | a path to an ONNX file (YuNet) | a detector object (any callable image -> boxes)."""
    if spec is None or spec == "none":
        return None
    if callable(spec):
        return spec
    if spec == "haar":
        return HaarDetector()
    if str(spec).endswith(".onnx"):
        return YuNetDetector(spec)
    raise ValueError(f"detector must be 'haar', 'none' or a YuNet .onnx file, got {spec!r}")
