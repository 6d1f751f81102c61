"""Video in and out, streamed: a decoder that runs ahead in a background thread into a bounded queue, an
annotated-mp4 writer, and landmark files (CSV rows as frames finish, NPZ at the end).

Every output is written to a ``*.part`` file beside its target and renamed into place when it is
complete, so a crash never leaves a half-written file under the final name; a video that is corrupt
part-way still gets its outputs for the frames that decoded (the caller closes the writers).
"""
from __future__ import annotations

import csv
import os
import queue
import threading
from pathlib import Path

import numpy as np

from ldeq_fast.data.wflw_v import VideoError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


class VideoReadError(VideoError):
    """A video that cannot be opened, or that fails part-way; ``path`` and ``frame`` (the first frame that
    could not be decoded, None if the file did not open) say where."""

    def __init__(self, path, frame, why: str):
        self.path, self.frame = str(path), frame
        where = "cannot be opened" if frame is None else f"frame {frame}"
        super().__init__(f"{path}: {where}: {why}")


def _av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is in the video extra
        raise ImportError("video input/output needs PyAV: pip install 'ldeq_fast[video]' (or pip install av)") from exc
    return av


def list_videos(inputs) -> list[Path]:
    """Files given directly and the video files (by suffix) directly inside given folders, in order."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


class FrameReader:
    """A video's frames as (H, W, 3) uint8 RGB, decoded ahead by a background thread into a queue of at most
    ``prefetch`` frames.  Opening happens here (a file that does not open raises :class:`VideoReadError`
    at once); iterating yields frames and raises :class:`VideoReadError` naming the frame where decoding
    failed, or where the stream ended short of the frame count its container declares.

    ``fps``, ``frames`` (declared count, None when the container does not say), ``width``, ``height``;
    ``threads``: FFmpeg decoding threads (0: its own choice)."""

    def __init__(self, path, prefetch: int = 4, threads: int = 0):
        av = _av()
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoReadError(self.path, None, "no such file")
        try:
            self._container = av.open(str(self.path))
            streams = self._container.streams.video
            if not streams:
                raise VideoReadError(self.path, None, "no video stream in the file")
        except av.error.FFmpegError as exc:
            raise VideoReadError(self.path, None, f"not a readable video ({exc})") from exc
        s = streams[0]
        if threads:          # on a CPU-bound run, leave the cores to the model
            s.codec_context.thread_count = int(threads)
        else:
            s.thread_type = "AUTO"
        self._stream = s
        self.width, self.height = int(s.codec_context.width), int(s.codec_context.height)
        rate = s.average_rate or s.guessed_rate
        self.fps = float(rate) if rate else 30.0
        self.frames = int(s.frames) if s.frames else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self):
        av = _av()
        n = 0
        try:
            for frame in self._container.decode(self._stream):
                if not self._put(("frame", frame.to_ndarray(format="rgb24"))):
                    return
                n += 1
            if self.frames is not None and n < self.frames:
                self._put(("error", VideoReadError(self.path, n, f"the stream ends after {n} of its {self.frames} "
                                                                 "frames (truncated or corrupt file)")))
            else:
                self._put(("end", None))
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            self._put(("error", VideoReadError(self.path, n, f"decoding failed ({exc})")))
        finally:
            self._container.close()

    def __iter__(self):
        if self._thread is not None:
            raise RuntimeError(f"{self.path}: a FrameReader is read once")
        self._thread = threading.Thread(target=self._work, name=f"decode:{self.path.name}", daemon=True)
        self._thread.start()
        try:
            while True:
                kind, item = self._queue.get()
                if kind == "frame":
                    yield item
                elif kind == "end":
                    return
                else:
                    raise item
        finally:
            self.close()

    def close(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        elif self._thread is None:
            self._container.close()


def _replace(part: Path, final: Path) -> None:
    os.replace(part, final)


def part_path(path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".part")


class VideoWriter:
    """Frames (H, W, 3) uint8 RGB -> an H.264 mp4 (yuv420p for even sizes, yuv444p otherwise, so the frame
    size is kept exactly); mpeg4 where this PyAV build has no libx264 (``codec`` says which).  Written to
    ``path.part`` and moved to ``path`` by :meth:`close`."""

    def __init__(self, path, fps: float, width: int, height: int, crf: int = 20, preset: str = "veryfast",
                 threads: int = 0):
        av = _av()
        self.path, self.part = Path(path), part_path(path)
        self.width, self.height, self.frames = int(width), int(height), 0
        self._container = av.open(str(self.part), "w", format="mp4", options={"movflags": "faststart"})
        self.codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        from fractions import Fraction

        self._stream = self._container.add_stream(self.codec, rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = self.width, self.height
        even = self.width % 2 == 0 and self.height % 2 == 0
        self._stream.pix_fmt = "yuv420p" if even or self.codec != "libx264" else "yuv444p"
        if self.codec == "libx264":
            self._stream.options = {"crf": str(crf), "preset": preset}
        if threads:
            self._stream.codec_context.thread_count = int(threads)
        self._av = av

    def write(self, image: np.ndarray) -> None:
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"{self.path}: frame of size {image.shape[1]}x{image.shape[0]}, the video is "
                             f"{self.width}x{self.height}")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        _replace(self.part, self.path)


class LandmarkCSV:
    """Rows ``<keys>, landmark, x, y, uncertainty, box_x1, box_y1, box_x2, box_y2, box_source`` as frames (or
    images) finish; an item without a face gets one row with landmark -1 and empty values.  ``keys``: the
    leading columns, ("frame",) for videos, ("image", "face") for photos."""

    COLUMNS = ("landmark", "x", "y", "uncertainty", "box_x1", "box_y1", "box_x2", "box_y2", "box_source")

    def __init__(self, path, keys=("frame",)):
        self.path, self.part = Path(path), part_path(path)
        self._file = open(self.part, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(tuple(keys) + self.COLUMNS)

    def write(self, keys, landmarks, uncertainty, box, source: str = "") -> None:
        keys = list(keys) if isinstance(keys, (tuple, list)) else [keys]
        b = ["", "", "", ""] if box is None else [f"{v:.2f}" for v in np.asarray(box)[:4]]
        if landmarks is None:
            self._csv.writerow(keys + [-1, "", "", ""] + b + [source])
            return
        self._csv.writerows(keys + [k, f"{x:.3f}", f"{y:.3f}", f"{u:.3f}"] + b + [source]
                            for k, ((x, y), u) in enumerate(zip(np.asarray(landmarks), np.asarray(uncertainty))))

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        _replace(self.part, self.path)


def probe_video(path) -> dict | None:
    """{'fps', 'frames' (None if undeclared), 'width', 'height'} of a video file, None if it does not open."""
    try:
        r = FrameReader(path)
    except VideoReadError:
        return None
    info = {"fps": r.fps, "frames": r.frames, "width": r.width, "height": r.height}
    r.close()
    return info


def save_npz(path, **arrays) -> None:
    """np.savez_compressed, written to ``path.part`` and renamed into place."""
    path = Path(path)
    part = part_path(path)
    with open(part, "wb") as f:
        np.savez_compressed(f, **arrays)
    _replace(part, path)


def write_text(path, text: str) -> None:
    path = Path(path)
    part = part_path(path)
    part.write_text(text, encoding="utf-8")
    _replace(part, path)


class BackgroundWorker:
    """Runs submitted calls in order on one background thread, at most ``depth`` waiting (``submit`` blocks
    beyond: memory stays bounded).  The first exception a call raises is re-raised by the next ``submit``
    or by ``close``."""

    def __init__(self, depth: int = 16, name: str = "writer"):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            if self._error is None:
                try:
                    fn(*args)
                except BaseException as exc:   # handed to the main thread
                    self._error = exc

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn, *args) -> None:
        self._raise()
        self._queue.put((fn, args))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()
