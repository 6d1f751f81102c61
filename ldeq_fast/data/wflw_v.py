"""WFLW-V video reader and per-frame face crops.

Layout under ``root``: ``landmarks/{id}.npy`` (T,98,2) frame pixels, ``bboxes/{id}.npy`` (T,>=4)
x1 y1 x2 y2 per frame, ``videos/{id}.mp4``, and a split file listing one video id per line.

Every per-video problem (missing or unreadable file, annotations of the wrong shape, fewer decoded frames
than annotated ones) raises :class:`VideoError` naming the id, so an evaluation loop can report the video
and go on with the next.  Videos are never silently truncated.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from ldeq_fast.data.transforms import affine_from_bbox, apply_affine, warp

N_POINTS = 98


class VideoError(RuntimeError):
    """A WFLW-V video that cannot be used as annotated; the message names the video id."""


class VideoClip(NamedTuple):
    frames: np.ndarray      # (T,H,W,3) uint8 RGB
    landmarks: np.ndarray   # (T,98,2) float32, frame pixels
    bboxes: np.ndarray      # (T,4) float32, x1 y1 x2 y2


class WFLWVideoSet:
    """The video ids of a split file (blank lines ignored); ``load(i)`` reads video ``i``."""

    def __init__(self, root, split_file):
        self.root = Path(root)
        split_file = Path(split_file)
        if not split_file.is_absolute() and not split_file.is_file():
            split_file = self.root / split_file
        if not split_file.is_file():
            raise FileNotFoundError(f"WFLW-V split file not found: {split_file}")
        self.split_file = split_file
        ids, seen = [], {}
        with open(split_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                vid = line.strip()
                if not vid:
                    continue
                if len(vid.split()) != 1:
                    raise ValueError(f"{split_file}:{lineno}: expected one video id per line, got {vid!r}")
                if vid in seen:
                    raise ValueError(f"{split_file}:{lineno}: video id {vid!r} repeats line {seen[vid]}")
                seen[vid] = lineno
                ids.append(vid)
        if not ids:
            raise ValueError(f"{split_file}: no video ids")
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> str:
        return self.ids[index]

    def __iter__(self):
        return iter(self.ids)

    def load(self, index: int) -> VideoClip:
        return load_video(self.root, self.ids[index])


def _load_array(path: Path, video_id: str, what: str) -> np.ndarray:
    if not path.is_file():
        raise VideoError(f"video {video_id!r}: {what} file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise VideoError(f"video {video_id!r}: could not read {what} file {path}: {e}") from e
    if not np.issubdtype(arr.dtype, np.number):
        raise VideoError(f"video {video_id!r}: {what} file {path} holds dtype {arr.dtype}, not numbers")
    return arr


def load_annotations(root, video_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(landmarks (T,98,2) float32, bboxes (T,4) float32) of a video, checked; nothing is decoded."""
    root = Path(root)
    landmarks = _load_array(root / "landmarks" / f"{video_id}.npy", video_id, "landmarks")
    bboxes = _load_array(root / "bboxes" / f"{video_id}.npy", video_id, "bboxes")
    if landmarks.ndim != 3 or landmarks.shape[1:] != (N_POINTS, 2):
        raise VideoError(f"video {video_id!r}: landmarks must have shape (T, {N_POINTS}, 2), got {landmarks.shape}")
    if bboxes.ndim != 2 or bboxes.shape[1] < 4:
        raise VideoError(f"video {video_id!r}: bboxes must have shape (T, >=4), got {bboxes.shape}")
    T = landmarks.shape[0]
    if bboxes.shape[0] != T:
        raise VideoError(f"video {video_id!r}: {T} annotated landmark frames but {bboxes.shape[0]} bboxes")
    if T == 0:
        raise VideoError(f"video {video_id!r}: no annotated frames")
    bboxes = bboxes[:, :4]
    if not np.isfinite(bboxes).all():
        raise VideoError(f"video {video_id!r}: bboxes contain NaN or inf")
    return landmarks.astype(np.float32), bboxes.astype(np.float32)


def iter_frames(root, video_id: str, n_frames: int):
    """Decode ``videos/{id}.mp4`` (OpenCV) one frame at a time: the first ``n_frames`` frames, (H,W,3) uint8
    RGB.  Raises :class:`VideoError` (naming the id) when the file does not open or fewer frames decode,
    after yielding those that did; frames beyond ``n_frames`` are dropped with a warning."""
    path = Path(root) / "videos" / f"{video_id}.mp4"
    if not path.is_file():
        raise VideoError(f"video {video_id!r}: video file not found: {path}")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"video {video_id!r}: OpenCV cannot open {path} (corrupt or unsupported); "
                             f"decoded 0 of {n_frames} annotated frames")
        n, shape = 0, None
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if n == n_frames:  # one frame past the annotations is enough to know there are more
                warnings.warn(f"video {video_id!r}: more frames decode than the {n_frames} annotated; using the "
                              f"first {n_frames}", stacklevel=2)
                break
            if shape is None:
                shape = bgr.shape
            elif bgr.shape != shape:
                raise VideoError(f"video {video_id!r}: frame {n} is {bgr.shape}, earlier frames {shape}")
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            n += 1
    finally:
        cap.release()
    if n < n_frames:
        raise VideoError(f"video {video_id!r}: decoded {n} frames from {path} but {n_frames} are annotated")


def load_video(root, video_id: str) -> VideoClip:
    """Decode ``videos/{id}.mp4`` (OpenCV) with its annotations.

    Returns (frames (T,H,W,3) uint8 RGB, landmarks (T,98,2) float32, bboxes (T,4) float32) where T is the
    number of annotated frames.  Raises :class:`VideoError` when fewer frames decode; frames decoded
    beyond the annotations are dropped with a warning.
    """
    landmarks, bboxes = load_annotations(root, video_id)
    T = landmarks.shape[0]
    frames = None
    for n, rgb in enumerate(iter_frames(root, video_id, T)):
        if frames is None:  # allocate once: full videos are large
            frames = np.empty((T, *rgb.shape), dtype=np.uint8)
        frames[n] = rgb
    return VideoClip(frames, landmarks, bboxes)


def crop_frames(frames: np.ndarray, bboxes, size: int = 256, extra_scale: float = 1.2
                ) -> tuple[np.ndarray, np.ndarray]:
    """Crop every frame around its box with :func:`affine_from_bbox`.

    Returns (crops (T,size,size,3) uint8, affines (T,2,3) float64 mapping frame to crop pixels).
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError("frames must be a uint8 array of shape (T, H, W, 3), got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}")
    b = np.asarray(bboxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] < 4 or b.shape[0] != frames.shape[0]:
        raise ValueError(f"bboxes must have shape (T, >=4) with T = {frames.shape[0]} frames, got {b.shape}")
    crops = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    affines = np.empty((frames.shape[0], 2, 3), dtype=np.float64)
    for t in range(frames.shape[0]):
        try:
            affines[t] = affine_from_bbox(b[t], extra_scale, size)
        except ValueError as e:
            raise ValueError(f"frame {t}: {e}") from e
        crops[t] = warp(frames[t], affines[t], size)
    return crops, affines


def keypoints_to_frame(kpts, affines, size: int = 256):
    """Map predictions normalised to the crops ((T,K,2) in [0,1]) back to frame pixels (T,K,2) through
    the inverse of each frame's crop affine (T,2,3), as the published evaluation does."""
    return apply_affine(kpts * size, affines, inverse=True)
