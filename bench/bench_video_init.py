"""`ldeq-fast video`'s comparison with and without the learned initial state, on the same clips.

The learned init (ldeq_fast/model/init_state.py) starts every cold solve: each video's first frame, every
reset, and every frame of per-frame inference; warm frames start from the previous fixed point either way.
Target: NME and NMF not worse with it.  Accuracy figures, not timings: machine load does not change them.

    python bench/bench_video_init.py --json bench/results/video_init_demo_cpu.json
"""
from __future__ import annotations

import argparse
import sys

import torch
from common import machine_info, write_json


def main(argv=None) -> int:
    from ldeq_fast.model import load_model
    from ldeq_fast.video.evaluate import evaluate_video_methods, format_rows, synthetic_clips

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--init", default="auto", help="initial-state file (default: the one beside the model)")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--val-videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with_init = load_model(a.model, init=a.init)
    if with_init.initial_state is None:
        raise SystemExit(f"{a.model} has no learned initial state (fit one with `ldeq-fast fit-init`)")
    without = load_model(a.model, init=None)
    size = with_init.cfg.im_size
    # the same clips as `ldeq-fast video` (test seed 0, validation seed 1)
    clips = synthetic_clips(a.videos, a.frames, size, seed=0, difficulty="hard")
    val = synthetic_clips(a.val_videos, a.frames, size, seed=1, difficulty="hard")
    res = {"machine": machine_info(), "model": a.model, "init": with_init.initial_state_info.get("path"),
           "videos": a.videos, "frames": a.frames, "runs": {}}
    for name, model in (("zeros", without), ("learned_init", with_init)):
        rows, _ = evaluate_video_methods(model, clips, val, slots=a.slots)
        for r in rows:
            r.pop("frames_per_s", None)     # timings of this run are not the point (and not interleaved)
        res["runs"][name] = rows
        print(f"cold starts from {name}:")
        print(format_rows([{**r, "frames_per_s": None} for r in rows]))
    base = {r["method"]: r for r in res["runs"]["zeros"]}
    res["delta"] = {r["method"]: {"nme": r["nme"] - base[r["method"]]["nme"], "nmf": r["nmf"] - base[r["method"]]["nmf"]}
                    for r in res["runs"]["learned_init"]}
    for method, d in res["delta"].items():
        print(f"{method:<22} learned init - zeros: NME {d['nme']:+.3f}, NMF {d['nmf']:+.2f}")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
