"""Many video streams through one tracker: a fixed number of batch slots, refilled as videos end.

Throughput is frames/s across streams: every step runs one batched forward over the frames of all busy
slots; when a video ends its slot takes the next waiting video (with a cold start).  Videos of different
lengths therefore share the batch without padding or sorting.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from ldeq_fast.video.tracker import RwRTracker


def run_streams(tracker: RwRTracker, videos: Sequence[Iterable[torch.Tensor]], slots: int = 8,
                progress: Callable[[int], None] | None = None, affines: Sequence | None = None) -> dict:
    """Track every video; each video is an iterable of preprocessed frames (3, H, W).  ``affines``, one
    (T_v, 2, 3) array per video (each frame's frame -> crop affine), lets the tracker align its state.

    Returns {'keypoints': [np.ndarray (T_v, K, 2)], 'cell_evals': [np.ndarray (T_v,)],
    'resets': [np.ndarray (T_v,)], 'frames': total, 'seconds': wall time, 'steps': batched forwards}."""
    if slots < 1:
        raise ValueError("slots must be >= 1")
    waiting = list(enumerate(videos))[::-1]
    if affines is not None and len(affines) != len(videos):
        raise ValueError(f"affines: {len(affines)} arrays for {len(videos)} videos")
    busy: dict[int, tuple[int, object]] = {}            # slot -> (video index, iterator)
    kpts = [[] for _ in videos]
    evals = [[] for _ in videos]
    resets = [[] for _ in videos]
    frames = steps = 0
    t0 = time.perf_counter()

    def fill(slot):
        while waiting:
            vid, frames_iter = waiting.pop()
            tracker.reset(vid)
            it = iter(frames_iter)
            try:
                first = next(it)
            except StopIteration:
                continue
            busy[slot] = (vid, it)
            return first
        busy.pop(slot, None)
        return None

    pending: dict[int, torch.Tensor] = {}
    for s in range(slots):
        fr = fill(s)
        if fr is not None:
            pending[s] = fr
    while pending:
        order = sorted(pending)
        vids = [busy[s][0] for s in order]
        aff = None
        if affines is not None:
            for v in vids:
                if len(kpts[v]) >= len(affines[v]):
                    raise ValueError(f"video {v}: more frames than its {len(affines[v])} affines")
            aff = np.stack([np.asarray(affines[v][len(kpts[v])]) for v in vids])  # this frame of each video
        res = tracker.step(torch.stack([pending[s] for s in order]), vids, aff)
        steps += 1
        frames += len(order)
        for j, v in enumerate(vids):
            kpts[v].append(res.keypoints[j].cpu().numpy())
            evals[v].append(int(res.cell_evals[j]))
            resets[v].append(bool(res.reset[j]))
        if progress is not None:
            progress(len(order))
        nxt = {}
        for s in order:
            try:
                nxt[s] = next(busy[s][1])
            except StopIteration:
                tracker.reset(busy[s][0])
                fr = fill(s)
                if fr is not None:
                    nxt[s] = fr
        pending = nxt
    return {"keypoints": [np.stack(k) if k else np.zeros((0, 0, 2)) for k in kpts],
            "cell_evals": [np.asarray(e) for e in evals], "resets": [np.asarray(r) for r in resets],
            "frames": frames, "seconds": time.perf_counter() - t0, "steps": steps}
