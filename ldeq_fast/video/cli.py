"""``ldeq-fast video``: per-frame vs filters vs RwR on synthetic hard videos (default) or WFLW-V."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo_synthetic.pt"


def load_model(spec: str, init="auto"):
    """'demo', an ldeq_fast .pt (+ .json) or a published checkpoint; ``init``: its learned initial state
    (default: ``<stem>.init.pt`` beside it when present; None: none)."""
    from ldeq_fast.model import load_published, load_weights

    if spec == "demo":
        if not DEMO_MODEL.is_file():
            raise FileNotFoundError(f"the shipped demo model is missing ({DEMO_MODEL}); reinstall ldeq_fast or "
                                    "train one with the command in the README")
        return load_weights(DEMO_MODEL, init=init)
    p = Path(spec)
    if p.suffix == ".pt" and p.with_suffix(".json").is_file():
        return load_weights(p, init=init)
    return load_published(p, init=init)


def model_path(spec: str) -> Path:
    """The file behind a ``--model`` spec (the demo model's for 'demo')."""
    return DEMO_MODEL if spec == "demo" else Path(spec)


def add_video_arguments(p: argparse.ArgumentParser) -> None:
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


def cmd_video(a) -> int:
    from ldeq_fast.machine import finish_record, machine_info
    from ldeq_fast.video.evaluate import (
        annotated_gif,
        evaluate_video_methods,
        format_rows,
        plot_trajectory,
        synthetic_clips,
        throughput_comparison,
        wflw_v_clips,
    )

    torch.manual_seed(0)
    model = load_model(a.model)
    if a.backend:
        model.cfg = model.cfg.replace(backend=a.backend)
    size = model.cfg.im_size
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if not a.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="ldeq-fast video", unit="frame", leave=False)
    prog = bar.update if bar is not None else None
    skipped = []
    if a.wflw_v:
        if not a.split:
            raise SystemExit("--wflw-v needs --split (a file of video ids)")
        clips, skipped = wflw_v_clips(a.wflw_v, a.split, size, a.limit)
        # no WFLW-V validation split exists: the filters are tuned on synthetic validation videos
        val = synthetic_clips(a.val_videos, a.frames, size, seed=1, difficulty=a.difficulty)
    else:
        clips = synthetic_clips(a.videos, a.frames, size, seed=0, difficulty=a.difficulty, keep_first=True)
        val = synthetic_clips(a.val_videos, a.frames, size, seed=1, difficulty=a.difficulty)
    if not clips:
        raise SystemExit("no usable videos")
    machine = machine_info()   # before the measurement; finish_record adds the load after it
    rows, preds = evaluate_video_methods(model, clips, val, slots=a.slots, warm_iters=a.warm_iters,
                                         prox_gamma=a.gamma, progress=prog, skipped=skipped)
    clips = [c for c in clips if c.name not in {vid for vid, _ in skipped}]
    speed = throughput_comparison(model, clips[: max(1, min(len(clips), a.slots))], a.slots, a.repeats)
    if bar is not None:
        bar.close()
    print(format_rows(rows))
    sp = speed["median_fps"]
    print(f"throughput (interleaved, median of {a.repeats}): still-image batches of {a.slots} "
          f"{sp['still_batches']:.1f} frames/s; multi-stream per-frame {sp['streams_per_frame']:.1f} frames/s "
          f"({sp['ratio_streams_vs_still']:.2f}x); multi-stream RwR warm {sp['streams_rwr_warm']:.1f} frames/s")
    for vid, why in skipped:
        print(f"skipped {vid}: {why}")
    res = {"machine": finish_record(machine), "model": a.model, "videos": [c.name for c in clips], "rows": rows,
           "throughput": speed, "skipped": skipped, "args": vars(a) | {"fn": None}}
    (out / "video_results.json").write_text(json.dumps(res, indent=1, default=str))
    plot_trajectory(preds, clips[0], out / "trajectory.png")
    if clips[0].frames is not None:
        annotated_gif(clips[0], preds, out / "clip.gif")
    print(f"wrote {out}/video_results.json, trajectory.png" + (", clip.gif" if clips[0].frames is not None else ""))
    return 0
