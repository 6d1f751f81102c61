"""Video evaluation: per-frame inference, per-frame + tuned filters, and RwR (warm / prox), side by side.

Every method sees the same crops (from each frame's box) and is scored in frame pixels with the
per-video NME and NMF (``ldeq_fast.metrics``), then averaged over videos.  Filters are tuned on a
separate validation set of videos for the lowest NMF whose NME is no worse than per-frame inference's.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldeq_fast import metrics
from ldeq_fast.data.transforms import affine_from_bbox, normalize_image, warp
from ldeq_fast.data.wflw_v import VideoError, crop_frames, keypoints_to_frame
from ldeq_fast.video.filters import FILTERS, tune_filter
from ldeq_fast.video.streams import run_streams
from ldeq_fast.video.tracker import RwRTracker, TrackerConfig


@dataclass
class Clip:
    """One video as the evaluation sees it.  The crops are not held: ``crops()`` makes them on demand, one
    frame at a time (decoded from the file for WFLW-V), so a pass over any number of videos holds O(slots)
    frames."""

    name: str
    affines: np.ndarray          # (T, 2, 3) frame -> crop
    landmarks: np.ndarray        # (T, K, 2) ground truth, frame pixels
    source: Callable[[], Iterable[np.ndarray]]   # the (S, S, 3) uint8 crops, frame by frame
    frames: np.ndarray | None = None   # kept only when a visual output needs them

    def crops(self) -> Iterator[torch.Tensor]:
        """The normalised model inputs (3, S, S), frame by frame."""
        for crop in self.source():
            yield normalize_image(crop)


def make_clip(name, frames, landmarks, bboxes, size, keep_frames=False) -> Clip:
    """A clip of frames in memory: its crops are made once and kept as uint8."""
    crops, affines = crop_frames(frames, bboxes, size=size)
    return Clip(name, affines, np.asarray(landmarks, np.float64), lambda: iter(crops),
                frames if keep_frames else None)


def synthetic_clips(n_videos, n_frames, size, seed=0, difficulty="hard", keep_first=False, progress=None):
    from ldeq_fast.data.synthetic import make_video

    clips = []
    for i in range(n_videos):
        v = make_video(seed * 1000 + i, n_frames, size=size, difficulty=difficulty)
        clips.append(make_clip(f"synthetic-{seed}-{i}", v.frames, v.landmarks, v.bboxes, size,
                               keep_frames=keep_first and i == 0))
        if progress:
            progress(1)
    return clips


def wflw_v_clips(root, split_file, size, limit=None, report=print):
    """WFLW-V videos as streamed clips: the annotations are read (and checked) now, each video is decoded
    and cropped frame by frame whenever a pass reads it.  A video whose annotations are unusable is reported
    by id and skipped; one that turns out corrupt or short while decoding is dropped by
    :func:`evaluate_video_methods` (its error names the id)."""
    from ldeq_fast.data.wflw_v import WFLWVideoSet, iter_frames, load_annotations

    vs = WFLWVideoSet(root, split_file)
    clips, skipped = [], []
    for i in range(len(vs) if limit is None else min(limit, len(vs))):
        vid = vs.ids[i]
        try:
            landmarks, bboxes = load_annotations(root, vid)
            affines = np.stack([affine_from_bbox(b, 1.2, size) for b in bboxes])
            if not (Path(root) / "videos" / f"{vid}.mp4").is_file():
                raise VideoError(f"video {vid!r}: video file not found: {Path(root) / 'videos' / f'{vid}.mp4'}")
        except (VideoError, ValueError) as exc:
            skipped.append((vid, str(exc)))
            report(f"skipping video {vid}: {exc}")
            continue

        def source(vid=vid, affines=affines):
            for frame, A in zip(iter_frames(root, vid, len(affines)), affines):
                yield warp(frame, A, size)

        clips.append(Clip(vid, affines, landmarks.astype(np.float64), source))
    return clips, skipped


def _score(preds, clips):
    nme = [metrics.video_nme(p, c.landmarks) for p, c in zip(preds, clips)]
    nmf = [metrics.video_nmf(p, c.landmarks) for p, c in zip(preds, clips)]
    return float(np.mean(nme)), float(np.mean(nmf)), nme, nmf


class ClipError(RuntimeError):
    """Clips that failed while decoding; ``errors`` maps the clip index to the message (naming the video)."""

    def __init__(self, errors: dict):
        self.errors = errors
        super().__init__("; ".join(errors.values()))


def track(model, clips, cfg: TrackerConfig, slots=8, progress=None):
    """Run a tracker over clips (many streams at once, frames streamed).  Returns (frame-pixel predictions
    (float32), run dict); raises :class:`ClipError` if a clip failed while decoding."""
    size = model.cfg.im_size
    out = run_streams(RwRTracker(model, cfg), [c.crops() for c in clips], slots=slots, progress=progress,
                      affines=[c.affines for c in clips])
    if out["errors"]:
        raise ClipError(out["errors"])
    preds = [keypoints_to_frame(k, c.affines, size).astype(np.float32) for k, c in zip(out["keypoints"], clips)]
    return preds, out


@torch.no_grad()
def still_batches_fps(model, clips, batch=8) -> float:
    """Frames/s of the same frames run as independent still-image batches (no tracker machinery); the
    frames are made as they are needed, as the trackers' are."""
    n, buf = 0, []
    t0 = time.perf_counter()
    for c in clips:
        for x in c.crops():
            buf.append(x)
            if len(buf) == batch:
                model(torch.stack(buf))
                n, buf = n + len(buf), []
    if buf:
        model(torch.stack(buf))
        n += len(buf)
    return n / (time.perf_counter() - t0)


def throughput_comparison(model, clips, slots=8, repeats=3) -> dict:
    """Frames/s of multi-stream per-frame tracking vs the same frames as still-image batches, and of RwR
    warm tracking; the three are interleaved and repeated (medians), so load drift hits all alike."""
    import statistics

    runs = {"streams_per_frame": [], "still_batches": [], "streams_rwr_warm": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, run = track(model, clips, TrackerConfig(mode="per_frame"), slots)
        runs["streams_per_frame"].append(run["frames"] / (time.perf_counter() - t0))
        runs["still_batches"].append(still_batches_fps(model, clips, slots))
        t0 = time.perf_counter()
        _, run = track(model, clips, TrackerConfig(mode="warm"), slots)
        runs["streams_rwr_warm"].append(run["frames"] / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in runs.items()}
    med["ratio_streams_vs_still"] = med["streams_per_frame"] / med["still_batches"]
    return {"median_fps": med, "runs": runs}


# RwR prox settings tried on the validation videos (at most 2 cell evaluations per frame)
PROX_GRID = [dict(gamma=g, prox_max_iters=k, motion=p)
             for p in ("translation", "none") for g in (0.25, 0.5, 1.0, 2.0) for k in (1, 2)]


def tune_tracker(model, val_clips, objective, grid, slots=8, progress=None, **fixed) -> tuple[dict, list[dict]]:
    """Grid-search TrackerConfig settings on validation videos like the filters are tuned:
    ``objective(preds, gt) -> float`` (lower is better).  Returns (best settings, every setting tried
    with its score); ties keep the first."""
    gt = [c.landmarks for c in val_clips]
    table = []
    for params in grid:
        preds, _ = track(model, val_clips, TrackerConfig(**fixed, **params), slots, progress)
        table.append({**params, "score": float(objective(preds, gt))})
    best = min(table, key=lambda r: r["score"])
    return {k: v for k, v in best.items() if k != "score"}, table


def evaluate_video_methods(model, clips, val_clips, slots=8, warm_iters=1, prox_gamma=None, progress=None,
                           filters=tuple(FILTERS), skipped: list | None = None):
    """The comparison table: one row per method with NME, NMF, cell evaluations per frame, frames/s.

    Filters and RwR prox (unless ``prox_gamma`` fixes it) are tuned on ``val_clips`` for the lowest
    flicker whose NME is no worse than per-frame inference's there; RwR warm is the published inference.
    Clips that fail while decoding in the first pass are dropped from every method (``(name, message)``
    appended to ``skipped``).  Returns (rows, {method: predictions of the first clip only}).
    """
    model.eval()
    rows, preds_by = [], {}
    clips = list(clips)

    def add(name, preds, run=None, tuned=None):
        nme, nmf, per_nme, per_nmf = _score(preds, clips)
        evals = None
        if run is not None:
            after_first = np.concatenate([e[1:] for e in run["cell_evals"] if len(e) > 1])
            evals = float(after_first.mean()) if after_first.size else None
        rows.append({"method": name, "nme": nme, "nmf": nmf, "cell_evals_per_frame": evals,
                     "frames_per_s": run["frames"] / run["seconds"] if run else None,
                     "resets": int(sum(r[1:].sum() for r in run["resets"])) if run else None,
                     "params": tuned, "per_video_nme": per_nme, "per_video_nmf": per_nmf})
        preds_by[name] = preds[:1]

    base_cfg = TrackerConfig(mode="per_frame")
    try:
        per_frame, run = track(model, clips, base_cfg, slots, progress)
    except ClipError as exc:
        for i in sorted(exc.errors):
            if skipped is not None:
                skipped.append((clips[i].name, exc.errors[i]))
        clips = [c for i, c in enumerate(clips) if i not in exc.errors]
        if not clips:
            raise
        per_frame, run = track(model, clips, base_cfg, slots, progress)
    add("per_frame", per_frame, run)
    objective = None
    if val_clips:
        val_preds, _ = track(model, val_clips, base_cfg, slots, progress)
        val_gt = [c.landmarks for c in val_clips]
        base_nme = np.mean([metrics.video_nme(p, g) for p, g in zip(val_preds, val_gt)])

        def objective(fp, gt):   # lowest flicker among settings that do not lose accuracy
            nme = np.mean([metrics.video_nme(p, g) for p, g in zip(fp, gt)])
            nmf = np.mean([metrics.video_nmf(p, g) for p, g in zip(fp, gt)])
            return nmf + 1e3 * max(0.0, nme - base_nme)

        for name in filters:
            params, _, _ = tune_filter(name, val_preds, val_gt, objective)
            fn = FILTERS[name][0]
            add(f"per_frame+{name}", [fn(p, **params) for p in per_frame], run, tuned=params)
    warm, run = track(model, clips, TrackerConfig(mode="warm", iters=warm_iters), slots, progress)
    add("rwr_warm", warm, run)
    if prox_gamma is not None or objective is None:
        prox_params = {"gamma": 1.0 if prox_gamma is None else float(prox_gamma)}
    else:
        prox_params, _ = tune_tracker(model, val_clips, objective, PROX_GRID, slots, progress, mode="prox")
    prox, run = track(model, clips, TrackerConfig(mode="prox", **prox_params), slots, progress)
    add("rwr_prox", prox, run, tuned=prox_params)
    return rows, preds_by


def format_rows(rows) -> str:
    lines = [f"{'method':<22} {'NME %':>7} {'NMF':>7} {'evals/frame':>11} {'frames/s':>9} {'resets':>6}"]
    for r in rows:
        ev = "-" if r["cell_evals_per_frame"] is None else f"{r['cell_evals_per_frame']:.2f}"
        fps = "-" if r["frames_per_s"] is None else f"{r['frames_per_s']:.1f}"
        rs = "-" if r["resets"] is None else str(r["resets"])
        lines.append(f"{r['method']:<22} {r['nme']:>7.3f} {r['nmf']:>7.3f} {ev:>11} {fps:>9} {rs:>6}")
    return "\n".join(lines)


def plot_trajectory(preds_by, clip, path, landmark=54, coord=0):
    """One landmark's coordinate over time for each method against ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(clip.landmarks[:, landmark, coord], "k-", lw=2, label="ground truth")
    for name, preds in preds_by.items():
        ax.plot(preds[0][:, landmark, coord], lw=1, label=name)
    ax.set(xlabel="frame", ylabel=f"landmark {landmark} {'xy'[coord]} (px)", title=clip.name)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def annotated_gif(clip, preds_by, path, methods=("per_frame", "rwr_warm"), max_frames=60):
    """Frames of one clip with ground truth (green) and each listed method's landmarks."""
    import cv2
    from PIL import Image

    colours = [(255, 64, 64), (64, 128, 255), (255, 200, 0)]
    images = []
    for t in range(min(len(clip.frames), max_frames)):
        img = clip.frames[t].copy()
        for x, y in clip.landmarks[t]:
            cv2.circle(img, (int(round(x)), int(round(y))), 1, (0, 255, 0), -1)
        for (name, col) in zip(methods, colours):
            for x, y in preds_by[name][0][t]:
                cv2.circle(img, (int(round(x)), int(round(y))), 1, col, -1)
        cv2.putText(img, " / ".join(["gt"] + list(methods)), (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (255, 255, 255), 1)
        images.append(Image.fromarray(img))
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)
