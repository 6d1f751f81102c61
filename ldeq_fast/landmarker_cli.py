"""``ldeq-fast predict`` (photos) and ``ldeq-fast track`` (videos): :class:`~ldeq_fast.landmarker.Landmarker`
on the command line.

Under ``torchrun --nproc_per_node N -m ldeq_fast.cli track ...`` (or any launcher that sets RANK and
WORLD_SIZE) rank r takes the files r, r+N, ... and writes their outputs and its own summary; the ranks never
communicate.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np


def _rank_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise SystemExit(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def _my_share(command: str, lister, paths: list, what: str) -> tuple[list, list, list, int, int]:
    """(all input files, their output names, the indices this rank takes, rank, world size)."""
    rank, world = _rank_world()
    try:
        files = lister(paths)
    except FileNotFoundError as exc:
        raise SystemExit(f"ldeq-fast {command}: {exc}") from exc
    if not files:
        raise SystemExit(f"ldeq-fast {command}: no {what} files found in " + " ".join(paths))
    return files, output_names(files), list(range(rank, len(files), world)), rank, world


def _device(arg):
    if arg:
        return arg
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def output_names(paths) -> list[str]:
    """A distinct output name per input file: its stem, with parent folders prepended where stems clash
    (the same for every rank: computed on the full list)."""
    paths = [Path(p) for p in paths]
    names = [p.stem for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        counts = Counter(names)
        names = [("__".join(p.with_suffix("").parts[-depth - 1:]) if counts[n] > 1 else n)
                 for p, n in zip(paths, names)]
        depth += 1
    seen = Counter()
    out = []
    for n in names:     # still equal (the same file twice): number them
        out.append(n if not seen[n] else f"{n}-{seen[n]}")
        seen[n] += 1
    return out


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (shipped, trained on synthetic faces), an ldeq_fast "
                   ".pt (with its .json) or a published checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--detector", default="haar", help="haar (OpenCV cascade, default), none, or a YuNet .onnx file")
    p.add_argument("--box", default=None, help="x1,y1,x2,y2: the face box (every image / the first frame)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--backend", default=None, help="solver backend (auto|torch|cpp|triton|cuda)")
    p.add_argument("--batch", type=int, default=8, help="images per forward (predict) / streams per step (track)")
    p.add_argument("--uncertainty", action="store_true", help="draw each landmark's uncertainty as a circle")
    p.add_argument("--no-progress", action="store_true")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    add_common(p)
    p.add_argument("--boxes", default=None, help="file of boxes per image (.json {name: box}, .csv name,x1,y1,x2,y2)")
    p.add_argument("--max-faces", type=int, default=1, help="faces per image (most prominent first)")
    p.add_argument("--no-images", action="store_true", help="write only the JSON/CSV, no annotated images")


def add_track_arguments(p: argparse.ArgumentParser) -> None:
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


def _landmarker(a, **extra):
    from ldeq_fast.landmarker import Landmarker

    return Landmarker(a.model, device=_device(a.device), detector=a.detector, backend=a.backend,
                      batch_size=a.batch, **extra)


def _bar(a, total, unit, rank):
    if a.no_progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=f"ldeq-fast {a.command}", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- predict
def cmd_predict(a) -> int:
    import cv2

    from ldeq_fast.detect import GivenBoxes, load_boxes, parse_box
    from ldeq_fast.draw import draw_landmarks
    from ldeq_fast.images import list_images
    from ldeq_fast.video.io import BackgroundWorker, LandmarkCSV, write_text

    files, names, mine, rank, world = _my_share("predict", list_images, a.images, "image")
    boxes = None
    if a.box and a.boxes:
        raise SystemExit("ldeq-fast predict: give --box or --boxes, not both")
    if a.box:
        boxes = GivenBoxes(box=parse_box(a.box))
    elif a.boxes:
        boxes = GivenBoxes(per_item=load_boxes(a.boxes))
    lm = _landmarker(a, max_faces=a.max_faces)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if world == 1 else f".rank{rank}"
    csv_out = LandmarkCSV(out / f"landmarks{suffix}.csv", keys=("image", "face"))
    writer = BackgroundWorker(depth=2 * a.batch, name="predict-writer")
    records, failed = [], 0
    bar = _bar(a, len(mine), "image", rank)
    t0 = time.perf_counter()

    def save_image(path, image, res):
        img = image
        for f in res.faces:
            img = draw_landmarks(img, f.landmarks, f.uncertainty if a.uncertainty else None, f.box, f.box_source)
        if not cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")

    try:
        for k, res in zip(mine, lm.iter_predict([files[i] for i in mine], boxes, keep_images=not a.no_images)):
            rec = {"image": str(files[k]), "width": res.width, "height": res.height, "error": res.error,
                   "faces": [{"box": f.box.round(2).tolist(), "box_source": f.box_source, "score": f.score,
                              "landmarks": f.landmarks.round(3).tolist(), "uncertainty": f.uncertainty.round(3).tolist(),
                              "iterations": f.iterations, "residual": f.residual, "converged": f.converged}
                             for f in res.faces]}
            records.append(rec)
            if res.error:
                failed += 1
                print(f"{files[k]}: {res.error}")
                csv_out.write((str(files[k]), -1), None, None, None)
            for j, f in enumerate(res.faces):
                csv_out.write((str(files[k]), j), f.landmarks, f.uncertainty, f.box, f.box_source)
            if not a.no_images and res.faces:
                writer.submit(save_image, out / f"{names[k]}.png", res.image, res)
            res.image = None
            if bar is not None:
                bar.update(1)
    finally:
        writer.close()
        csv_out.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    summary = {"images": len(mine), "with_face": len(mine) - failed, "without_face": failed,
               "seconds": seconds, "images_per_s": len(mine) / seconds if seconds > 0 else None,
               "model": str(a.model), "detector": lm.detector_name, "rank": rank, "world_size": world,
               "results": records}
    write_text(out / f"landmarks{suffix}.json", json.dumps(summary, indent=1))
    print(f"{len(mine) - failed}/{len(mine)} images with landmarks ({seconds:.1f} s); wrote {out}/landmarks{suffix}.json"
          f", .csv" + ("" if a.no_images else " and annotated images"))
    return 0


# ------------------------------------------------------------------------------------------------- track
class _VideoSink:
    """One video's outputs, written on the writer thread: annotated mp4, CSV rows, then NPZ + summary JSON."""

    def __init__(self, out: Path, name: str, source: str, info: dict | None, draw_video: bool, uncertainty: bool,
                 run: dict):
        self.out, self.name, self.source, self.info = out, name, source, info or {}
        self.draw_video, self.uncertainty, self.run = draw_video, uncertainty, run
        self.csv = None            # opened when the video starts: a run of many videos holds O(slots) files
        self.video = None
        self.rows: list = []       # per-frame landmark arrays (small), for the NPZ
        self.t_first = self.t_last = None

    def write(self, f) -> None:
        from ldeq_fast.draw import draw_landmarks
        from ldeq_fast.video.io import LandmarkCSV, VideoWriter

        if self.csv is None:
            self.csv = LandmarkCSV(self.out / f"{self.name}.csv")
        self.rows.append((f.index, f.landmarks, f.uncertainty, f.box, f.box_source, f.reset, f.cell_evals,
                          f.residual, f.note))
        self.csv.write(f.index, f.landmarks, f.uncertainty, f.box, f.box_source)
        if self.draw_video:
            if self.video is None:
                h, w = f.image.shape[:2]
                self.video = VideoWriter(self.out / f"{self.name}.mp4", self.info.get("fps") or 30.0, w, h,
                                         threads=self.run["io_threads"])
            label = f"{f.index}" + (" reset" if f.reset else "") + (f" {f.note}" if f.note else "")
            self.video.write(draw_landmarks(f.image, f.landmarks, f.uncertainty if self.uncertainty else None,
                                            f.box, f.box_source, label))

    def close(self, error, seconds) -> dict:
        from ldeq_fast.video.io import LandmarkCSV, save_npz, write_text

        if self.csv is None:       # no frame decoded: an empty CSV (header only)
            self.csv = LandmarkCSV(self.out / f"{self.name}.csv")
        K = self.run["n_keypoints"]
        T = len(self.rows)
        lms = np.full((T, K, 2), np.nan, np.float32)
        unc = np.full((T, K), np.nan, np.float32)
        box = np.full((T, 4), np.nan, np.float32)
        face = np.zeros(T, bool)
        for i, (_, L, U, B, *_rest) in enumerate(self.rows):
            if L is not None:
                lms[i], unc[i], face[i] = L, U, True
            if B is not None:
                box[i] = B
        frame = np.array([r[0] for r in self.rows], np.int64)
        resets = np.array([r[5] for r in self.rows], bool)
        evals = np.array([r[6] for r in self.rows], np.int64)
        sources = np.array([r[4] for r in self.rows], dtype="U16")
        if self.video is not None:
            self.video.close()
        self.csv.close()
        save_npz(self.out / f"{self.name}.npz", frame=frame, landmarks=lms, uncertainty=unc, box=box,
                 box_source=sources, face=face, reset=resets, cell_evals=evals,
                 residual=np.array([r[7] for r in self.rows], np.float32))
        after_first = np.zeros(T, bool)
        seen = False
        for i in range(T):          # a reset on a stream's first face frame is its start, not a loss
            if face[i]:
                after_first[i] = seen
                seen = True
            else:
                seen = False
        summary = {
            "video": self.source, "frames": T, "frames_with_face": int(face.sum()),
            "frames_without_face": int((~face).sum()), "resets": int((resets & after_first).sum()),
            "cell_evals_per_frame": float(evals[face].mean()) if face.any() else None,
            "seconds": seconds, "frames_per_s": T / seconds if seconds and seconds > 0 else None,
            "box_sources": dict(Counter(s for s, f in zip(sources.tolist(), face) if f)),
            "error": None if error is None else str(error),
            "error_frame": getattr(error, "frame", None),
            "outputs": [f"{self.name}.{ext}" for ext in (("mp4",) if self.video is not None else ()) + ("npz", "csv")],
            **{k: v for k, v in self.run.items() if k != "n_keypoints"},
        }
        if self.video is not None:
            summary["codec"] = self.video.codec
        write_text(self.out / f"{self.name}.json", json.dumps(summary, indent=1))
        self.rows, self.csv, self.video = [], None, None
        return summary


def _boxes_for(arg, video: Path, n_videos: int):
    from ldeq_fast.detect import load_boxes

    if arg is None:
        return None
    p = Path(arg)
    if p.is_dir():
        for ext in (".npy", ".csv", ".txt", ".json"):
            f = p / f"{video.stem}{ext}"
            if f.is_file():
                return load_boxes(f)
        return None
    if n_videos != 1:
        raise SystemExit("ldeq-fast track: --boxes FILE is for one video; for several give a folder of files "
                         "named after the videos")
    return load_boxes(p)


def cmd_track(a) -> int:
    from dataclasses import asdict

    from ldeq_fast.detect import parse_box
    from ldeq_fast.landmarker import VideoEnd
    from ldeq_fast.machine import finish_record, machine_info
    from ldeq_fast.video.io import BackgroundWorker, list_videos, probe_video, write_text

    files, names, mine, rank, world = _my_share("track", list_videos, a.videos, "video")
    first_box = parse_box(a.box) if a.box else None
    boxes = [_boxes_for(a.boxes, files[i], len(files)) for i in mine]
    lm = _landmarker(a, mode=a.mode, redetect_every=a.redetect_every)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()   # before the measurement; finish_record adds the load after it
    infos = [probe_video(files[i]) for i in mine]
    total = sum((inf or {}).get("frames") or 0 for inf in infos) or None
    run = {"model": str(lm.model_name), "mode": a.mode, "tracker": asdict(lm.tracker_cfg), "detector": lm.detector_name,
           "device": str(lm.device), "n_keypoints": lm.model.cfg.n_keypoints,
           "io_threads": lm.io_threads}
    sinks = [_VideoSink(out, names[i], str(files[i]), inf, not a.no_video, a.uncertainty, run)
             for i, inf in zip(mine, infos)]
    writer = BackgroundWorker(depth=2 * a.batch, name="track-writer")
    bar = _bar(a, total, "frame", rank)
    summaries: list = [None] * len(mine)
    firsts: dict = {}
    t0 = time.perf_counter()
    frames = 0

    def finish(j, error, seconds):
        summaries[j] = sinks[j].close(error, seconds)

    try:
        for ev in lm.track_many([files[i] for i in mine], [first_box] * len(mine), boxes, slots=a.batch,
                                keep_frames=not a.no_video, prefetch=a.prefetch):
            now = time.perf_counter()
            if isinstance(ev, VideoEnd):
                seconds = now - firsts.get(ev.video, now)
                writer.submit(finish, ev.video, ev.error, seconds)
                if ev.error is not None:
                    print(f"ldeq-fast track: {ev.error} (the {ev.frames} frames before it are in the outputs)")
                continue
            firsts.setdefault(ev.video, now)
            frames += 1
            writer.submit(sinks[ev.video].write, ev)
            if bar is not None:
                bar.update(1)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    done = [s for s in summaries if s is not None]
    face = [s for s in done if s["frames_with_face"]]
    report = {"machine": finish_record(machine), "rank": rank, "world_size": world, "videos": done,
              "frames": frames, "seconds": seconds, "frames_per_s": frames / seconds if seconds > 0 else None,
              "cell_evals_per_frame": (float(np.average([s["cell_evals_per_frame"] for s in face],
                                                         weights=[s["frames_with_face"] for s in face]))
                                       if face else None),
              "resets": sum(s["resets"] for s in done),
              "frames_without_face": sum(s["frames_without_face"] for s in done),
              "errors": [s["error"] for s in done if s["error"]], **{k: v for k, v in run.items() if k != "n_keypoints"}}
    suffix = "" if world == 1 else f".rank{rank}"
    write_text(out / f"summary{suffix}.json", json.dumps(report, indent=1))
    for s in done:
        print(f"{s['video']}: {s['frames']} frames, {s['frames_without_face']} without a face, {s['resets']} resets"
              + (f", ERROR: {s['error']}" if s["error"] else ""))
    print(f"{frames} frames in {seconds:.1f} s ({report['frames_per_s']:.1f} frames/s"
          + (f", {report['cell_evals_per_frame']:.2f} cell evaluations per frame" if face else "")
          + f"); wrote {out}/summary{suffix}.json")
    return 1 if report["errors"] else 0
