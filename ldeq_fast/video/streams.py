"""Many video streams through one tracker: a fixed number of batch slots, refilled as videos end.

Throughput is frames/s across streams: every step runs one batched forward over the frames of all busy
slots; when a video ends its slot takes the next waiting video (with a cold start).  Videos of different
lengths therefore share the batch without padding or sorting.

Frames are pulled lazily, one per busy slot, and only after the consumer has seen the previous step's
events: a video's iterator may decode its next frame on demand and crop it from its last result
(landmark-driven boxes), so a run holds O(slots) frames however many and however long the videos are.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ldeq_fast.data.wflw_v import VideoError
from ldeq_fast.video.tracker import FrameResult, RwRTracker


@dataclass
class StreamEvent:
    """One frame of one video (``result`` is None for a frame without a face: nothing ran on it), or, with
    ``end`` set, the end of a video (``error``: the :class:`VideoError` that cut it short, else None)."""

    video: int
    frame: int
    result: FrameResult | None = None   # the step's batched result; this video's row is ``row``
    row: int = -1
    end: bool = False
    error: VideoError | None = None


def iter_streams(tracker: RwRTracker, videos: Sequence[Iterable], slots: int = 8,
                 affines: Sequence | None = None) -> Iterator[StreamEvent]:
    """Track every video, yielding a :class:`StreamEvent` per frame (in step order) and one when a video ends.

    A video is an iterable of frames; a frame is a preprocessed image (3, H, W), an ``(image, affine)`` pair
    (that frame's frame -> crop affine (2, 3), which lets the tracker align its state across crops), or
    None: no face on this frame, so nothing runs and the stream restarts cold at its next face.
    ``affines``, alternatively: one (T_v, 2, 3) array per video.  A video whose iterator raises
    :class:`VideoError` (a corrupt file, part-way) ends there with the error in its end event; its earlier
    frames stand, and the other videos go on.
    """
    if slots < 1:
        raise ValueError("slots must be >= 1")
    if affines is not None and len(affines) != len(videos):
        raise ValueError(f"affines: {len(affines)} arrays for {len(videos)} videos")
    waiting = list(enumerate(videos))[::-1]
    busy: dict[int, tuple[int, Iterator]] = {}        # slot -> (video index, iterator)
    count = [0] * len(videos)                          # frames consumed per video
    ended: list[StreamEvent] = []                      # events of frames / ends found while refilling

    def advance(slot):
        """The slot's next frame with a face (image, affine or None); ends and refills videos on the way."""
        while True:
            if slot not in busy:
                if not waiting:
                    return None
                vid, src = waiting.pop()
                tracker.reset(vid)
                busy[slot] = (vid, iter(src))
            vid, it = busy[slot]
            try:
                fr = next(it)
            except StopIteration:
                fr, err, done = None, None, True
            except VideoError as exc:
                fr, err, done = None, exc, True
            else:
                done = False
            if done:
                tracker.reset(vid)
                del busy[slot]
                ended.append(StreamEvent(vid, count[vid], end=True, error=err))
                continue
            if fr is None:                           # no face: the stream starts cold at its next face
                tracker.reset(vid)
                ended.append(StreamEvent(vid, count[vid]))
                count[vid] += 1
                continue
            image, aff = fr if isinstance(fr, tuple) else (fr, None)
            if affines is not None:
                if count[vid] >= len(affines[vid]):
                    raise ValueError(f"video {vid}: more frames than its {len(affines[vid])} affines")
                aff = affines[vid][count[vid]]
            return image, aff

    pending = {}
    for s in range(slots):
        fr = advance(s)
        if fr is not None:
            pending[s] = fr
    yield from ended
    while pending:
        ended.clear()
        order = sorted(pending)
        vids = [busy[s][0] for s in order]
        affs = [pending[s][1] for s in order]
        if any(a is None for a in affs) and not all(a is None for a in affs):
            raise ValueError("either every frame comes with its affine or none does")
        aff = None if affs[0] is None else np.stack([np.asarray(a, dtype=np.float64) for a in affs])
        res = tracker.step(torch.stack([pending[s][0] for s in order]), vids, aff)
        for j, v in enumerate(vids):
            yield StreamEvent(v, count[v], res, j)
            count[v] += 1
        pending = {}
        for s in order:
            fr = advance(s)
            if fr is not None:
                pending[s] = fr
        yield from ended


def run_streams(tracker: RwRTracker, videos: Sequence[Iterable], slots: int = 8,
                progress: Callable[[int], None] | None = None, affines: Sequence | None = None) -> dict:
    """:func:`iter_streams` with the results collected.

    Returns {'keypoints': [np.ndarray (T_v, K, 2)] (NaN on frames without a face), 'cell_evals':
    [np.ndarray (T_v,)], 'resets': [np.ndarray (T_v,)], 'errors': {video: message} for videos cut short,
    'frames': total, 'seconds': wall time, 'steps': batched forwards}."""
    K = tracker.model.cfg.n_keypoints
    kpts = [[] for _ in videos]
    evals = [[] for _ in videos]
    resets = [[] for _ in videos]
    errors = {}
    frames = steps = 0
    last = None
    t0 = time.perf_counter()
    for ev in iter_streams(tracker, videos, slots, affines):
        if ev.end:
            if ev.error is not None:
                errors[ev.video] = str(ev.error)
            continue
        frames += 1
        if ev.result is None:
            kpts[ev.video].append(np.full((K, 2), np.nan, np.float32))
            evals[ev.video].append(0)
            resets[ev.video].append(False)
        else:
            if ev.result is not last:
                steps += 1
                last = ev.result
            kpts[ev.video].append(ev.result.keypoints[ev.row].cpu().numpy())
            evals[ev.video].append(int(ev.result.cell_evals[ev.row]))
            resets[ev.video].append(bool(ev.result.reset[ev.row]))
        if progress is not None:
            progress(1)
    return {"keypoints": [np.stack(k) if k else np.zeros((0, 0, 2)) for k in kpts],
            "cell_evals": [np.asarray(e) for e in evals], "resets": [np.asarray(r) for r in resets],
            "errors": errors, "frames": frames, "seconds": time.perf_counter() - t0, "steps": steps}
