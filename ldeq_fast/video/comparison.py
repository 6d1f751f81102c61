"""The video comparison as one call (``ldeq-fast video`` is its command line): per-frame vs filters vs RwR on
synthetic hard videos or WFLW-V, a throughput comparison, and the outputs (table JSON, trajectory plot, GIF)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def compare_video_methods(model, out, *, wflw_v=None, split=None, limit=None, videos=8, val_videos=4, frames=60,
                          difficulty="hard", slots=8, warm_iters=1, gamma=None, repeats=3, progress=None,
                          record: dict | None = None) -> dict:
    """Evaluate every video method on synthetic videos (or the WFLW-V ``split`` under ``wflw_v``) and write
    ``video_results.json``, ``trajectory.png`` and (synthetic) ``clip.gif`` into ``out``.  ``progress``: called
    with the frames done; ``record``: extra entries for the JSON.  Returns the results, with ``written`` (the
    files) added."""
    from ldeq_fast.machine import finish_record, machine_info
    from ldeq_fast.video.evaluate import (
        annotated_gif,
        evaluate_video_methods,
        plot_trajectory,
        synthetic_clips,
        throughput_comparison,
        wflw_v_clips,
    )

    torch.manual_seed(0)
    size = model.cfg.im_size
    out = Path(out)
    skipped = []
    if wflw_v:
        if not split:
            raise ValueError("WFLW-V evaluation needs a split file of video ids")
        clips, skipped = wflw_v_clips(wflw_v, split, size, limit)
        # no WFLW-V validation split exists: the filters are tuned on synthetic validation videos
        val = synthetic_clips(val_videos, frames, size, seed=1, difficulty=difficulty)
    else:
        clips = synthetic_clips(videos, frames, size, seed=0, difficulty=difficulty, keep_first=True)
        val = synthetic_clips(val_videos, frames, size, seed=1, difficulty=difficulty)
    if not clips:
        raise ValueError(f"no usable videos in {wflw_v}" if wflw_v else "no videos to evaluate (videos must be >= 1)")
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()   # before the measurement; finish_record adds the load after it
    rows, preds = evaluate_video_methods(model, clips, val, slots=slots, warm_iters=warm_iters, prox_gamma=gamma,
                                         progress=progress, skipped=skipped)
    clips = [c for c in clips if c.name not in {vid for vid, _ in skipped}]
    speed = throughput_comparison(model, clips[: max(1, min(len(clips), slots))], slots, repeats)
    res = {"machine": finish_record(machine), "videos": [c.name for c in clips], "rows": rows, "throughput": speed,
           "skipped": skipped, **(record or {})}
    (out / "video_results.json").write_text(json.dumps(res, indent=1, default=str))
    written = ["video_results.json", "trajectory.png"]
    plot_trajectory(preds, clips[0], out / "trajectory.png")
    if clips[0].frames is not None:
        annotated_gif(clips[0], preds, out / "clip.gif")
        written.append("clip.gif")
    return {**res, "written": [out / w for w in written]}
