"""Landmarks on your own photos and videos: face detection, the published crop, batching, the mapping back to
the image's pixels, and RwR tracking with landmark-driven boxes.

    lm = Landmarker("demo")                       # or an ldeq_fast .pt, or a published checkpoint
    r = lm.predict("photo.jpg")                   # ImageResult: r.faces[0].landmarks (K, 2) image pixels
    for f in lm.track("clip.mp4"):                # TrackedFrame per frame, lazily
        f.landmarks, f.uncertainty, f.box, f.reset

Tracking (per video, every decision its own, so a video gives the same landmarks alone or batched with
others): the first frame's box comes from the user (``box`` / ``boxes``) or the detector; each later crop is
the box of the previous frame's landmarks (as MediaPipe-style trackers do), calibrated to the convention
of the last detected / given box (the offset and scale between that box and its landmarks' extent are
kept) and stabilised (a box that moved by less than ``box_deadband`` of its side keeps the previous crop).
The face is looked for again with the detector when the tracker resets (landmarks that jumped: a cut or a
lost face) or the landmarks' box leaves the frame, and every ``redetect_every`` frames when set (the
detector's box wins when it disagrees with the tracked one: IoU < ``redetect_iou``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ldeq_fast.data.transforms import apply_affine, normalize_image
from ldeq_fast.detect import FaceBox, GivenBoxes, box_iou, make_detector
from ldeq_fast.images import ImageError, as_rgb_uint8, check_box, crop_face, read_image
from ldeq_fast.video.streams import iter_streams
from ldeq_fast.video.tracker import RwRTracker, TrackerConfig

# The RwR settings tuned on synthetic validation videos for `ldeq-fast video` (bench/results/
# video_synthetic_demo_cpu.json: the lowest flicker at no loss of accuracy, 2 cell evaluations per frame).
TUNED_PROX = dict(gamma=0.5, prox_max_iters=2, motion="translation")


def tracker_config(mode: str = "prox", **overrides) -> TrackerConfig:
    """The tracker settings for ``mode``: prox with the tuned settings, warm = the published video inference
    (1 iteration + the extra step), per_frame = every frame solved from zeros."""
    base = {"prox": dict(mode="prox", **TUNED_PROX), "warm": dict(mode="warm", iters=1),
            "per_frame": dict(mode="per_frame")}
    if mode not in base:
        raise ValueError(f"mode must be one of {tuple(base)}, not {mode!r}")
    return TrackerConfig(**{**base[mode], **overrides})


@dataclass
class Face:
    landmarks: np.ndarray        # (K, 2) image pixels (x, y)
    uncertainty: np.ndarray      # (K,) each landmark's heatmap spread, image pixels
    box: np.ndarray              # (4,) x1, y1, x2, y2 the crop was made from
    box_source: str              # 'given' | 'haar' | 'yunet' | ...
    score: float                 # the detector's score (1 for a given box)
    affine: np.ndarray           # (2, 3) image -> crop pixels
    iterations: int              # solver iterations
    residual: float              # final relative residual
    converged: bool


@dataclass
class ImageResult:
    source: str                  # the file, or 'image {i}' for an array
    faces: list = field(default_factory=list)
    width: int = 0
    height: int = 0
    error: str | None = None     # why there are no landmarks: unreadable file, no face found, bad box
    image: np.ndarray | None = None   # the RGB image, when asked for (keep_images)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.faces)

    @property
    def landmarks(self):
        """The first (most prominent) face's landmarks, None without a face."""
        return self.faces[0].landmarks if self.faces else None


@dataclass
class TrackedFrame:
    video: int                   # index of the video in the call
    index: int                   # frame number
    landmarks: np.ndarray | None  # (K, 2) frame pixels; None: no face on this frame
    uncertainty: np.ndarray | None
    box: np.ndarray | None       # (4,) the crop's box
    box_source: str              # 'given' | 'landmarks' | the detector's name | ''
    reset: bool = False          # the solve started cold (first frame, re-detection, a jump)
    cell_evals: int = 0
    residual: float = float("nan")
    note: str = ""               # why there is no face, when there is none
    image: np.ndarray | None = None   # the decoded frame, when asked for (keep_frames)


@dataclass
class VideoEnd:
    video: int
    frames: int                  # frames handled (decoded)
    error: Exception | None      # a VideoReadError that cut the video short


def _is_single_image(x) -> bool:
    return isinstance(x, (str, Path)) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def _scale_of(A: np.ndarray) -> float:
    return math.sqrt(abs(float(np.linalg.det(A[:, :2]))))


class Landmarker:
    """Face landmarks for photos (:meth:`predict`) and videos (:meth:`track`, :meth:`track_many`).

    model: 'demo' (the shipped model), an ldeq_fast ``.pt`` with its ``.json``, a published checkpoint, or
    an LDEQ.  device: default CUDA when available.  detector: 'haar' (default; OpenCV's cascade), a YuNet
    ``.onnx`` path, 'none', or any callable image -> [FaceBox].  mode / tracker: RwR settings for videos
    (default prox with the tuned settings; see :func:`tracker_config`).
    """

    def __init__(self, model="demo", device=None, detector="haar", mode: str = "prox",
                 tracker: TrackerConfig | None = None, batch_size: int = 8, backend: str | None = None,
                 max_faces: int = 1, extra_scale: float = 1.2, box_deadband: float = 0.02,
                 redetect_every: int | None = None, redetect_iou: float = 0.3):
        from ldeq_fast.model.ldeq import LDEQ
        from ldeq_fast.model.loading import load_model

        self.model_name = model if isinstance(model, (str, Path)) else type(model).__name__
        m = model if isinstance(model, LDEQ) else load_model(str(model))
        if backend:
            m.cfg = m.cfg.replace(backend=backend)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = m.to(self.device).eval()
        self.size = m.cfg.im_size
        self._detector_spec, self._detector = detector, None
        self.tracker_cfg = tracker or tracker_config(mode)
        if batch_size < 1 or max_faces < 1:
            raise ValueError("batch_size and max_faces must be >= 1")
        self.batch_size, self.max_faces, self.extra_scale = batch_size, max_faces, extra_scale
        self.box_deadband, self.redetect_every, self.redetect_iou = box_deadband, redetect_every, redetect_iou
        # FFmpeg threads for decoding / encoding: one on a CPU run (the model has the cores), else its choice
        self.io_threads = 1 if self.device.type == "cpu" else 0

    @property
    def detector(self):
        """The detector, built on first use (so boxes-only use never needs the Haar files)."""
        if self._detector is None and self._detector_spec not in (None, "none"):
            self._detector = make_detector(self._detector_spec)
        return self._detector

    @property
    def detector_name(self) -> str:
        spec = self._detector_spec
        return "none" if spec in (None, "none") else getattr(self.detector, "name", str(spec))

    # ------------------------------------------------------------------------------------------ photos
    def predict(self, images, boxes=None):
        """Landmarks for one image or a batch.

        images: a file path, an array (H, W[, C]) (grey / RGB / RGBA; uint8, uint16 or float in [0, 1]), or a
        list of those (or an (N, H, W, C) array).  boxes: None (detect), one box (x1, y1, x2, y2) for every
        image, a list with one box (or None: detect) per image, or a :class:`GivenBoxes`.
        Returns an :class:`ImageResult` (a list of them for a batch); problems with one image (unreadable,
        no face, a box outside it) are reported in its ``error``, never raised."""
        single = _is_single_image(images)
        results = list(self.iter_predict([images] if single else images, boxes))
        return results[0] if single else results

    def iter_predict(self, images: Iterable, boxes=None, keep_images: bool = False) -> Iterator[ImageResult]:
        """:meth:`predict` lazily, ``batch_size`` images at a time; the next batch is read and its faces found
        on a background thread while the model runs.  ``keep_images``: each result carries its RGB image."""
        items = list(images) if not isinstance(images, list) else images
        per_image = None
        if isinstance(boxes, GivenBoxes):
            given = boxes
        elif boxes is None:
            given = None
        else:
            arr = np.asarray(boxes, dtype=object)
            if arr.ndim == 1 and len(arr) == 4 and all(isinstance(v, (int, float, np.number)) for v in arr):
                given = GivenBoxes(box=np.asarray(boxes, np.float64))
            else:
                if len(boxes) != len(items):
                    raise ValueError(f"boxes: {len(boxes)} entries for {len(items)} images")
                per_image, given = list(boxes), None
        chunks = [list(range(i, min(i + self.batch_size, len(items))))
                  for i in range(0, len(items), self.batch_size)]

        def prepare(idx):
            out = []
            for i in idx:
                b = None if per_image is None else per_image[i]
                out.append(self._prepare_image(items[i], i, b, given))
            return out

        with ThreadPoolExecutor(1, thread_name_prefix="ldeq-predict") as pool:
            nxt = pool.submit(prepare, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                prepared = nxt.result()
                nxt = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
                for res, img, _ in prepared:
                    res.image = img if keep_images else None
                yield from self._run_prepared(prepared)

    def _prepare_image(self, item, i, box, given: GivenBoxes | None):
        """(result, image, [(box, crop, affine)]): read, find faces, crop."""
        name = str(item) if isinstance(item, (str, Path)) else f"image {i}"
        res = ImageResult(name)
        try:
            img = read_image(item) if isinstance(item, (str, Path)) else as_rgb_uint8(item, name)
        except ImageError as exc:
            res.error = str(exc)
            return res, None, []
        res.height, res.width = img.shape[:2]
        try:
            if box is not None:
                faces = [FaceBox(*check_box(box, img.shape, f"{name}: box"), 1.0, "given")]
            elif given is not None:
                faces = given.lookup(item if isinstance(item, (str, Path)) else i)
                if not faces:
                    res.error = f"{name}: no box given for it"
                    return res, img, []
                faces = [replace(f, **dict(zip("x1 y1 x2 y2".split(), check_box(f.as_array(), img.shape,
                                                                                 f"{name}: box"))))
                         for f in faces]
            elif self.detector is None:
                res.error = f"{name}: no box given and no detector (detector='none')"
                return res, img, []
            else:
                faces = self.detector(img)
                if not faces:
                    res.error = f"{name}: no face found ({self.detector_name} detector)"
                    return res, img, []
            crops = []
            for f in faces[: self.max_faces]:
                crop, A = crop_face(img, f.as_array(), self.size, self.extra_scale)
                crops.append((f, crop, A))
        except ImageError as exc:
            res.error = str(exc)
            return res, img, []
        return res, img, crops

    @torch.no_grad()
    def _run_prepared(self, prepared) -> Iterator[ImageResult]:
        crops = [c for _, _, cs in prepared for c in cs]
        if crops:
            x = normalize_image(np.stack([c for _, c, _ in crops])).to(self.device)
            out = self.model(x)
            kp = out.keypoints.double().cpu().numpy() * self.size
            unc = out.uncertainty.double().cpu().numpy() * self.size
            st = out.stats
            iters = st.nstep.cpu().numpy() if st is not None else np.zeros(len(crops), int)
            resid = st.best_residual.double().cpu().numpy() if st is not None else np.full(len(crops), np.nan)
            conv = st.converged.cpu().numpy() if st is not None else np.zeros(len(crops), bool)
        j = 0
        for res, _, cs in prepared:
            for f, _, A in cs:
                res.faces.append(Face(landmarks=apply_affine(kp[j], A, inverse=True),
                                      uncertainty=unc[j] / _scale_of(A), box=f.as_array(), box_source=f.source,
                                      score=f.score, affine=A, iterations=int(iters[j]), residual=float(resid[j]),
                                      converged=bool(conv[j])))
                j += 1
            yield res

    # ------------------------------------------------------------------------------------------ videos
    def track(self, video, box=None, boxes=None, keep_frames: bool = False) -> Iterator[TrackedFrame]:
        """Track one video (a file, an array (T, H, W[, C]) or any iterable of frames): a lazy
        :class:`TrackedFrame` per frame.  box: the first frame's face box; boxes: {frame: box or None} or a
        (T, 4) array (NaN rows: no face) for given per-frame boxes.  A video corrupt part-way raises its
        :class:`~ldeq_fast.video.io.VideoReadError` after the frames that decoded."""
        for ev in self.track_many([video], [box], [boxes], slots=1, keep_frames=keep_frames):
            if isinstance(ev, VideoEnd):
                if ev.error is not None:
                    raise ev.error
            else:
                yield ev

    def track_many(self, videos, box=None, boxes=None, slots: int = 8, keep_frames: bool = False,
                   prefetch: int = 4) -> Iterator[TrackedFrame | VideoEnd]:
        """Many videos as multi-stream batch slots: TrackedFrame events of all videos (in step order) and a
        :class:`VideoEnd` when each ends.  ``box`` / ``boxes``: one entry per video (see :meth:`track`)."""
        n = len(videos)
        box = [None] * n if box is None else list(box)
        boxes = [None] * n if boxes is None else list(boxes)
        if len(box) != n or len(boxes) != n:
            raise ValueError(f"box / boxes need one entry per video ({n})")
        streams = [_VideoStream(self, i, v, box[i], boxes[i], keep_frames, prefetch) for i, v in enumerate(videos)]
        tracker = RwRTracker(self.model, self.tracker_cfg)
        for ev in iter_streams(tracker, [s.frames() for s in streams], slots):
            s = streams[ev.video]
            if ev.end:
                yield VideoEnd(ev.video, s.decoded, ev.error)
                s.pending.clear()
            elif ev.result is None:
                yield s.no_face(ev.frame)
            else:
                yield s.on_result(ev.frame, ev.result, ev.row)


def _normalise_boxes(boxes) -> dict | None:
    if boxes is None or isinstance(boxes, dict):
        return boxes
    a = np.asarray(boxes, np.float64)
    if a.ndim != 2 or a.shape[1] < 4:
        raise ValueError(f"boxes must be a dict frame -> box or an array (T, 4), got shape {a.shape}")
    return {t: (r[:4] if np.isfinite(r[:4]).all() else None) for t, r in enumerate(a)}


class _VideoStream:
    """One video's frames for :func:`iter_streams` and its box state (every decision per stream)."""

    def __init__(self, lm: Landmarker, index: int, video, box, boxes, keep_frames: bool, prefetch: int):
        self.lm, self.index, self.video = lm, index, video
        self.boxes = _normalise_boxes(boxes)
        if box is not None:
            self.boxes = {**(self.boxes or {}), 0: np.asarray(box, np.float64)[:4]}
        self.keep_frames, self.prefetch = keep_frames, prefetch
        self.pending: dict[int, tuple] = {}     # frame -> (image, box, source, affine) awaiting its result
        self.decoded = 0
        self.next_box: np.ndarray | None = None  # from the last landmarks
        self.last_box: np.ndarray | None = None
        self.calib = None                        # (centre offset / extent side (2,), box side / extent side)
        self.redetect = False
        self.since_detect = 0
        self.fresh = True                        # the next solve starts the stream (a reset there is expected)
        self.note = ""

    def _frames_source(self):
        if isinstance(self.video, (str, Path)):
            from ldeq_fast.video.io import FrameReader

            return FrameReader(self.video, self.prefetch, self.lm.io_threads)
        return self.video

    def _detect(self, image) -> tuple[np.ndarray | None, str]:
        det = self.lm.detector
        if det is None:
            return None, ""
        found = det(image)
        if not found:
            return None, ""
        return found[0].as_array(), found[0].source

    def _choose_box(self, t: int, image) -> tuple[np.ndarray | None, str]:
        self.note = ""
        if self.boxes is not None and t in self.boxes:         # the user's box for this frame
            b = self.boxes[t]
            if b is None:
                self.note = "no box given for this frame"
                return None, "given"
            self.redetect = False
            return np.asarray(b, np.float64), "given"
        periodic = (self.lm.redetect_every and self.next_box is not None
                    and self.since_detect >= self.lm.redetect_every)
        if self.next_box is not None and not self.redetect and not periodic:
            return self.next_box, "landmarks"
        b, src = self._detect(image)
        self.since_detect = 0
        if b is not None:
            if periodic and not self.redetect and box_iou(b, self.next_box) >= self.lm.redetect_iou:
                self.since_detect = 0
                return self.next_box, "landmarks"              # the detector agrees: keep the tracked crop
            self.redetect = False
            return b, src
        if self.next_box is not None:     # not found: keep following the landmarks (one try per trigger)
            self.redetect = False
            return self.next_box, "landmarks"
        if self.last_box is not None and self.lm.detector is None:
            return self.last_box, "landmarks"                  # no detector: wait where the face was
        self.note = ("no face found" if self.lm.detector is not None
                     else "no box for this frame and no detector")
        return None, ""

    def frames(self):
        lm = self.lm
        for t, raw in enumerate(self._frames_source()):
            self.decoded = t + 1
            image = as_rgb_uint8(raw, f"video {self.index} frame {t}")
            box, src = self._choose_box(t, image)
            if box is not None:
                try:
                    box = check_box(box, image.shape, f"frame {t}: box")
                    crop, A = crop_face(image, box, lm.size, lm.extra_scale)
                except ImageError as exc:
                    self.note, box = str(exc), None
            if box is None:
                self.pending[t] = (image, None, src, None, self.note)
                yield None
                continue
            if src != "landmarks":
                self.fresh = True   # a new box: the tracker's state is resampled (align), its reset not a loss
            self.pending[t] = (image, box, src, A, "")
            yield normalize_image(crop).to(lm.device), A

    def no_face(self, t: int) -> TrackedFrame:
        image, box, src, _, note = self.pending.pop(t)
        self.next_box, self.calib, self.fresh = None, None, True
        return TrackedFrame(self.index, t, None, None, None, src, note=note,
                            image=image if self.keep_frames else None)

    def on_result(self, t: int, res, row: int) -> TrackedFrame:
        lm = self.lm
        image, box, src, A, _ = self.pending.pop(t)
        kp = res.keypoints[row].double().cpu().numpy() * lm.size
        L = apply_affine(kp, A, inverse=True)
        unc = res.uncertainty[row].double().cpu().numpy() * lm.size / _scale_of(A)
        reset = bool(res.reset[row])
        lo, hi = L.min(0), L.max(0)
        centre, ext = (lo + hi) / 2, float(max(hi - lo))
        if src != "landmarks" and ext > 0:   # calibrate landmark boxes to this box's convention
            side = float(max(box[2] - box[0], box[3] - box[1]))
            self.calib = (((box[:2] + box[2:]) / 2 - centre) / ext, side / ext)
            self.since_detect = 0
        else:
            self.since_detect += 1
        if reset and not self.fresh:
            self.redetect = True                # the landmarks jumped: look for the face again
        self.fresh = False
        H, W = image.shape[:2]
        if self.calib is None or ext <= 0 or not (0 <= centre[0] < W and 0 <= centre[1] < H):
            self.next_box, self.redetect = None, True   # the face left the frame
        else:
            c = centre + self.calib[0] * ext
            half = self.calib[1] * ext / 2
            new = np.array([c[0] - half, c[1] - half, c[0] + half, c[1] + half])
            prev = self.next_box if self.next_box is not None else box
            side_prev = float(prev[2] - prev[0])
            moved = np.abs((new[:2] + new[2:]) / 2 - (prev[:2] + prev[2:]) / 2).max() / max(side_prev, 1e-9)
            grown = abs(math.log(max(new[2] - new[0], 1e-9) / max(side_prev, 1e-9)))
            stable = src == "landmarks" and moved < lm.box_deadband and grown < 1.5 * lm.box_deadband
            self.next_box = prev if stable else new
        self.last_box = box
        return TrackedFrame(self.index, t, L, unc, box, src, reset=reset, cell_evals=int(res.cell_evals[row]),
                            residual=float(res.residual[row]), image=image if self.keep_frames else None)
