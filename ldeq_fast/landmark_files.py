"""A :class:`~ldeq_fast.landmarker.Landmarker` run over lists of files, written into a folder: per photo an
annotated image, one CSV and one JSON for all (:func:`predict_to_folder`); per video an annotated mp4, an NPZ,
a CSV and a summary JSON, plus one summary for the run (:func:`track_to_folder`).  ``ldeq-fast predict`` and
``ldeq-fast track`` are their command lines."""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np


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


def boxes_for_video(boxes, video: Path):
    """Per-frame boxes of one video: ``boxes`` is a box file (for this video) or a folder holding one file
    named after each video (None when the folder has none for it)."""
    from ldeq_fast.detect import load_boxes

    p = Path(boxes)
    if p.is_dir():
        for ext in (".npy", ".csv", ".txt", ".json"):
            f = p / f"{Path(video).stem}{ext}"
            if f.is_file():
                return load_boxes(f)
        return None
    return load_boxes(p)


def predict_to_folder(lm, files: list, names: list, out, boxes=None, *, write_images: bool = True,
                      draw_uncertainty: bool = False, suffix: str = "", progress=None, report=None,
                      record: dict | None = None) -> dict:
    """Landmarks of every image in ``files`` into ``out``: ``landmarks{suffix}.json`` (the returned summary),
    ``landmarks{suffix}.csv`` and, with ``write_images``, ``<name>.png`` annotated (``names``: one per file).
    ``boxes``: a :class:`~ldeq_fast.detect.GivenBoxes` or None (the detector's).  An image without a face is
    a result with ``error`` set, passed to ``report(file, error)`` too; ``progress()`` is called per image;
    ``record``: extra entries for the summary."""
    import cv2

    from ldeq_fast.draw import draw_landmarks
    from ldeq_fast.video.io import BackgroundWorker, LandmarkCSV, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_out = LandmarkCSV(out / f"landmarks{suffix}.csv", keys=("image", "face"))
    writer = BackgroundWorker(depth=2 * lm.batch_size, name="predict-writer")
    records, failed = [], 0
    t0 = time.perf_counter()

    def save_image(path, image, res):
        img = image
        for f in res.faces:
            img = draw_landmarks(img, f.landmarks, f.uncertainty if draw_uncertainty else None, f.box, f.box_source)
        if not cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")

    try:
        for file, name, res in zip(files, names, lm.iter_predict(list(files), boxes, keep_images=write_images)):
            rec = {"image": str(file), "width": res.width, "height": res.height, "error": res.error,
                   "faces": [{"box": f.box.round(2).tolist(), "box_source": f.box_source, "score": f.score,
                              "landmarks": f.landmarks.round(3).tolist(), "uncertainty": f.uncertainty.round(3).tolist(),
                              "iterations": f.iterations, "residual": f.residual, "converged": f.converged}
                             for f in res.faces]}
            records.append(rec)
            if res.error:
                failed += 1
                if report is not None:
                    report(file, res.error)
                csv_out.write((str(file), -1), None, None, None)
            for j, f in enumerate(res.faces):
                csv_out.write((str(file), j), f.landmarks, f.uncertainty, f.box, f.box_source)
            if write_images and res.faces:
                writer.submit(save_image, out / f"{name}.png", res.image, res)
            res.image = None
            if progress is not None:
                progress()
    finally:
        writer.close()
        csv_out.close()
    seconds = time.perf_counter() - t0
    n = len(files)
    summary = {"images": n, "with_face": n - failed, "without_face": failed,
               "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None,
               "model": str(lm.model_name), "detector": lm.detector_name, **(record or {}), "results": records}
    write_text(out / f"landmarks{suffix}.json", json.dumps(summary, indent=1))
    return summary


class VideoSink:
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


def track_to_folder(lm, files: list, names: list, out, first_box=None, boxes=None, *, write_video: bool = True,
                    draw_uncertainty: bool = False, prefetch: int = 4, suffix: str = "", progress=None, report=None,
                    record: dict | None = None, infos: list | None = None) -> dict:
    """Track every video in ``files`` (``lm.batch_size`` of them at a time, as batch slots) into ``out``: per
    video ``<name>.mp4`` (with ``write_video``), ``.npz``, ``.csv`` and ``.json``; the run's
    ``summary{suffix}.json`` (the returned report, with ``record`` merged in).  ``first_box``: the first
    frame's box of every video; ``boxes``: per-frame boxes per video (None entries: the detector's).  A video
    cut short by a read error keeps the frames before it, and ``report(error, frames)`` is called;
    ``progress()`` is called per frame; ``infos``: the videos' :func:`~ldeq_fast.video.io.probe_video` results,
    when the caller has them already."""
    from ldeq_fast.landmarker import VideoEnd
    from ldeq_fast.machine import finish_record, machine_info
    from ldeq_fast.video.io import BackgroundWorker, probe_video, write_text

    machine = machine_info()   # before the measurement; finish_record adds the load after it
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = [probe_video(f) for f in files] if infos is None else infos
    run = {"model": str(lm.model_name), "mode": lm.tracker_cfg.mode,
           "tracker": asdict(lm.tracker_cfg), "detector": lm.detector_name, "device": str(lm.device),
           "n_keypoints": lm.model.cfg.n_keypoints, "io_threads": lm.io_threads}
    sinks = [VideoSink(out, name, str(f), inf, write_video, draw_uncertainty, run)
             for f, name, inf in zip(files, names, infos)]
    writer = BackgroundWorker(depth=2 * lm.batch_size, name="track-writer")
    summaries: list = [None] * len(files)
    firsts: dict = {}
    t0 = time.perf_counter()
    frames = 0

    def finish(j, error, seconds):
        summaries[j] = sinks[j].close(error, seconds)

    try:
        for ev in lm.track_many(list(files), [first_box] * len(files), boxes, slots=lm.batch_size,
                                keep_frames=write_video, prefetch=prefetch):
            now = time.perf_counter()
            if isinstance(ev, VideoEnd):
                seconds = now - firsts.get(ev.video, now)
                writer.submit(finish, ev.video, ev.error, seconds)
                if ev.error is not None and report is not None:
                    report(ev.error, ev.frames)
                continue
            firsts.setdefault(ev.video, now)
            frames += 1
            writer.submit(sinks[ev.video].write, ev)
            if progress is not None:
                progress()
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    done = [s for s in summaries if s is not None]
    face = [s for s in done if s["frames_with_face"]]
    report_ = {"machine": finish_record(machine), **(record or {}), "videos": done,
               "frames": frames, "seconds": seconds, "frames_per_s": frames / seconds if seconds > 0 else None,
               "cell_evals_per_frame": (float(np.average([s["cell_evals_per_frame"] for s in face],
                                                          weights=[s["frames_with_face"] for s in face]))
                                        if face else None),
               "resets": sum(s["resets"] for s in done),
               "frames_without_face": sum(s["frames_without_face"] for s in done),
               "errors": [s["error"] for s in done if s["error"]],
               **{k: v for k, v in run.items() if k != "n_keypoints"}}
    write_text(out / f"summary{suffix}.json", json.dumps(report_, indent=1))
    return report_
