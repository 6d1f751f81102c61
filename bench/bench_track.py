"""`ldeq-fast track` throughput: 8 synthetic videos tracked at once vs the same frames as still-image batches.

Both sides include decoding the mp4s (PyAV, a background thread per video) and cropping each frame:

* still_batches: frame t of every video, cropped from the generator's per-frame box, one batch of
  ``--videos`` images through the model (a full solve per image from the model's default start: its learned
  initial state when it has one, zeros otherwise);
* track_per_frame: Landmarker.track_many over the same files in ``--videos`` slots, boxes from the landmarks,
  every frame solved cold from the same start -- the same model work as still_batches, so the ratio is the price of the
  tracking machinery (target >= 0.9x);
* track_prox: the default tracker (RwR prox, tuned: 2 cell evaluations per frame);
* track_cli: the whole ``ldeq-fast track`` command with its outputs (annotated mp4, CSV, NPZ) written on
  the writer thread.

Interleaved repeats, medians, the machine recorded:

    python bench/bench_track.py --json bench/results/track_cpu.json
    python bench/bench_track.py --frames 8 --repeats 1 --json /tmp/track_smoke.json     # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, write_json


def make_videos(folder: Path, n: int, frames: int, size: int, difficulty: str):
    from ldeq_fast.data.synthetic import make_video
    from ldeq_fast.video.io import VideoWriter

    paths, boxes = [], []
    for i in range(n):
        v = make_video(100 + i, frames, size=size, difficulty=difficulty)
        p = folder / f"synthetic_{i}.mp4"
        w = VideoWriter(p, 30, v.frames.shape[2], v.frames.shape[1], crf=12)
        for f in v.frames:
            w.write(f)
        w.close()
        paths.append(p)
        boxes.append(v.bboxes)
    return paths, boxes


@torch.no_grad()
def still_batches(lm, paths, boxes) -> int:
    """Decode (background readers), crop with the given boxes, one batch per frame index. Returns frames."""
    from ldeq_fast.data.transforms import normalize_image
    from ldeq_fast.images import crop_face
    from ldeq_fast.video.io import FrameReader

    readers = [iter(FrameReader(p, threads=lm.io_threads)) for p in paths]
    n = 0
    for t in range(len(boxes[0])):
        crops = [crop_face(next(r), b[t], lm.size)[0] for r, b in zip(readers, boxes)]
        lm.model(normalize_image(np.stack(crops)).to(lm.device))
        n += len(crops)
    for r in readers:
        r.close()
    return n


def track(lm, paths, boxes) -> int:
    from ldeq_fast.landmarker import TrackedFrame

    return sum(isinstance(ev, TrackedFrame) for ev in lm.track_many(paths, [b[0] for b in boxes], slots=len(paths)))


def track_cli(model, paths, boxes, out: Path, device) -> int:
    from ldeq_fast.apps.track import run as cmd_track
    from ldeq_fast.cli import build_parser

    n = len(boxes[0]) * len(paths)
    for p, b in zip(paths, boxes):      # a first-frame box per video, as a box file
        np.save(out / f"{p.stem}.npy", b[:1])
    a = build_parser().parse_args(["track", *map(str, paths), "--out", str(out / "run"), "--boxes", str(out),
                                   "--detector", "none", "--batch", str(len(paths)), "--no-progress",
                                   "--device", str(device)])
    a.model = model
    if cmd_track(a) != 0:
        raise RuntimeError("ldeq-fast track failed")
    return n


def main(argv=None) -> int:
    from ldeq_fast.landmarker import Landmarker
    from ldeq_fast.ops import recording_backends

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--difficulty", default="hard", choices=("normal", "hard"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-cli", action="store_true", help="skip the full command with its outputs")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    per_frame = Landmarker(a.model, device=a.device, detector="none", mode="per_frame")
    prox = Landmarker(per_frame.model, device=a.device, detector="none", mode="prox")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, boxes = make_videos(tmp, a.videos, a.frames, per_frame.size, a.difficulty)
        methods = {"still_batches": lambda: still_batches(per_frame, paths, boxes),
                   "track_per_frame": lambda: track(per_frame, paths, boxes),
                   "track_prox": lambda: track(prox, paths, boxes)}
        if not a.no_cli:
            methods["track_cli"] = lambda: track_cli(prox.model, paths, boxes, tmp, a.device)
        backends = {}
        for name, fn in methods.items():      # warm-up: kernels, allocator, file cache; what ran
            with recording_backends() as ran:
                fn()
            backends[name] = dict(sorted(ran.items()))
        fps: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(a.repeats):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                n = fn()
                fps[name].append(n / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in fps.items()}
    res = {"machine": machine_info(a.device), "model": a.model, "device": a.device, "videos": a.videos,
           "frames_per_video": a.frames, "difficulty": a.difficulty, "repeats": a.repeats,
           "median_frames_per_s": med, "runs_frames_per_s": fps, "backends": backends,
           "ratio_track_per_frame_vs_still": med["track_per_frame"] / med["still_batches"],
           "ratio_track_prox_vs_still": med["track_prox"] / med["still_batches"]}
    if "track_cli" in med:
        res["ratio_track_cli_vs_still"] = med["track_cli"] / med["still_batches"]
    for k, v in med.items():
        print(f"{k:<16} {v:8.1f} frames/s   ({v / med['still_batches']:.2f}x still batches)")
    write_json(a.json, res)
    if a.json:
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
