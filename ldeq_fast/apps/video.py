"""``ldeq-fast video``: per-frame vs filters vs RwR on synthetic hard videos (default) or WFLW-V."""
from __future__ import annotations

import argparse

from ldeq_fast.apps.common import UsageError

NAME = "video"
HELP = "per-frame vs filters vs RwR on synthetic hard videos or WFLW-V"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (shipped, trained on synthetic faces), an ldeq_fast "
                   ".pt (with its .json) or a published checkpoint")
    p.add_argument("--wflw-v", default=None, help="WFLW-V root (landmarks/, bboxes/, videos/) instead of synthetic")
    p.add_argument("--split", default=None, help="WFLW-V split file of video ids")
    p.add_argument("--limit", type=int, default=None, help="at most this many WFLW-V videos")
    p.add_argument("--videos", type=int, default=8, help="synthetic test videos")
    p.add_argument("--val-videos", type=int, default=4, help="synthetic validation videos (filter and RwR tuning)")
    p.add_argument("--frames", type=int, default=60, help="frames per synthetic video")
    p.add_argument("--difficulty", default="hard", choices=("normal", "hard"))
    p.add_argument("--slots", type=int, default=8, help="streams run together (batch slots)")
    p.add_argument("--warm-iters", type=int, default=1)
    p.add_argument("--gamma", type=float, default=None, help="RwR prox pull toward the previous fixed point "
                   "(default: tuned with its iterations and motion prediction on the validation videos)")
    p.add_argument("--out", default="video_out", help="folder for the table JSON, trajectory plot and GIF")
    p.add_argument("--backend", default=None, help="solver backend (auto|torch|cpp|triton|cuda)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the throughput comparison")
    p.add_argument("--no-progress", action="store_true")


def run(a) -> int:
    from ldeq_fast.model import load_model
    from ldeq_fast.video.comparison import compare_video_methods
    from ldeq_fast.video.evaluate import format_rows

    if a.wflw_v and not a.split:
        raise UsageError("--wflw-v needs --split (a file of video ids)")
    model = load_model(a.model)
    if a.backend:
        model.cfg = model.cfg.replace(backend=a.backend)
    bar = None
    if not a.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="ldeq-fast video", unit="frame", leave=False)
    try:
        res = compare_video_methods(
            model, a.out, wflw_v=a.wflw_v, split=a.split, limit=a.limit, videos=a.videos, val_videos=a.val_videos,
            frames=a.frames, difficulty=a.difficulty, slots=a.slots, warm_iters=a.warm_iters, gamma=a.gamma,
            repeats=a.repeats, progress=bar.update if bar is not None else None,
            record={"model": a.model, "args": {k: v for k, v in vars(a).items() if k != "fn"}})
    finally:
        if bar is not None:
            bar.close()
    print(format_rows(res["rows"]))
    sp = res["throughput"]["median_fps"]
    print(f"throughput (interleaved, median of {a.repeats}): still-image batches of {a.slots} "
          f"{sp['still_batches']:.1f} frames/s; multi-stream per-frame {sp['streams_per_frame']:.1f} frames/s "
          f"({sp['ratio_streams_vs_still']:.2f}x); multi-stream RwR warm {sp['streams_rwr_warm']:.1f} frames/s")
    for vid, why in res["skipped"]:
        print(f"skipped {vid}: {why}")
    print(f"wrote {a.out}/" + ", ".join(p.name for p in res["written"]))
    return 0
