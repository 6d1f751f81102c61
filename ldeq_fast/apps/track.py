"""``ldeq-fast track``: landmarks on videos (RwR; many videos run together as batch slots)."""
from __future__ import annotations

import argparse

from ldeq_fast.apps.common import UsageError, print_error
from ldeq_fast.apps.landmarking import add_common, landmarker, my_share, progress_bar

NAME = "track"
HELP = "landmarks on videos (RwR, many videos as batch slots): annotated mp4, .npz, .csv and a summary per video"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="+", help="video files and/or folders of videos")
    add_common(p)
    p.add_argument("--boxes", default=None, help="per-frame boxes: a file (.npy (T,4), .csv, .json) for one video, "
                   "or a folder with one file per video named after it")
    p.add_argument("--mode", default="prox", choices=("prox", "warm", "per_frame"),
                   help="RwR prox (tuned settings, default), warm (published: 2 cell evaluations per frame), or "
                        "every frame solved from zeros")
    p.add_argument("--redetect-every", type=int, default=None, help="also check the tracked box with the "
                   "detector every N frames")
    p.add_argument("--prefetch", type=int, default=4, help="frames decoded ahead per video")
    p.add_argument("--no-video", action="store_true", help="skip the annotated mp4 (landmarks files only)")


def run(a) -> int:
    """Exit status 1 when a video failed (each failure is reported; the frames before it are kept), else 0."""
    from pathlib import Path

    from ldeq_fast.detect import parse_box
    from ldeq_fast.landmark_files import boxes_for_video, track_to_folder
    from ldeq_fast.video.io import list_videos, probe_video

    files, names, rank, world, n_all = my_share(list_videos, a.videos, "video")
    if a.boxes and not Path(a.boxes).is_dir() and n_all != 1:
        raise UsageError("--boxes FILE is for one video; for several give a folder of files named after the videos")
    first_box = parse_box(a.box) if a.box else None
    boxes = [boxes_for_video(a.boxes, f) if a.boxes else None for f in files]
    lm = landmarker(a, mode=a.mode, redetect_every=a.redetect_every)
    infos = [probe_video(f) for f in files]
    total = sum((inf or {}).get("frames") or 0 for inf in infos) or None
    bar = progress_bar(a, total, "frame", rank)
    suffix = "" if world == 1 else f".rank{rank}"

    def report(error, frames):
        print_error(NAME, f"{error}" + (f" (the {frames} frames before it are in the outputs)" if frames else ""))

    try:
        r = track_to_folder(lm, files, names, a.out, first_box, boxes, write_video=not a.no_video,
                            draw_uncertainty=a.uncertainty, prefetch=a.prefetch, suffix=suffix, infos=infos,
                            progress=bar.update if bar is not None else None, report=report,
                            record={"rank": rank, "world_size": world})
    finally:
        if bar is not None:
            bar.close()
    for s in r["videos"]:
        print(f"{s['video']}: {s['frames']} frames, {s['frames_without_face']} without a face, {s['resets']} resets"
              + (f", ERROR: {s['error']}" if s["error"] else ""))
    print(f"{r['frames']} frames in {r['seconds']:.1f} s ({r['frames_per_s']:.1f} frames/s"
          + (f", {r['cell_evals_per_frame']:.2f} cell evaluations per frame" if r["cell_evals_per_frame"] is not None else "")
          + f"); wrote {a.out}/summary{suffix}.json")
    return 1 if r["errors"] else 0
