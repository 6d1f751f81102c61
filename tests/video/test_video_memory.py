"""Video work streams frames: a run over 20 videos holds no more memory than one over 2.

Measured two ways at once: live tensor bytes (PeakTensorMemory, every tensor an op returns) and the peak
of Python/numpy allocations (tracemalloc: numpy reports its buffers, decoded frames included).  Holding one
extra frame per video would add ~18 frames (> 2 MB here) to the 20-video run; the tolerance is far below."""
import tracemalloc

import numpy as np
import pytest
import torch

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.data.synthetic import make_video
from ldeq_fast.memory import PeakTensorMemory

pytest.importorskip("av")

N_FRAMES = 3


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LDEQ(LDEQConfig.small(injection_width=8, cell_base_width=8, cell_width_increment=2, max_iters=2,
                                 backend="torch")).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A WFLW-V-layout folder of 20 short synthetic videos (the same clip, so every run does equal work)."""
    from ldeq_fast.video.io import VideoWriter

    r = tmp_path_factory.mktemp("wflwv")
    for d in ("videos", "landmarks", "bboxes"):
        (r / d).mkdir()
    v = make_video(0, N_FRAMES, size=128, difficulty="normal")
    w = VideoWriter(r / "videos" / "base.mp4", 30, v.frames.shape[2], v.frames.shape[1], crf=12)
    for f in v.frames:
        w.write(f)
    w.close()
    data = (r / "videos" / "base.mp4").read_bytes()
    for i in range(20):
        (r / "videos" / f"{i:03d}.mp4").write_bytes(data)
        np.save(r / "landmarks" / f"{i:03d}.npy", v.landmarks)
        np.save(r / "bboxes" / f"{i:03d}.npy", v.bboxes)
    return r, v


def _peaks(fn):
    import gc

    gc.collect()
    tracemalloc.start()
    try:
        with PeakTensorMemory() as mem:
            fn()
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return mem.peak_bytes, py_peak


def _check(small, large):
    (t2, p2), (t20, p20) = small, large
    assert t20 <= 1.1 * t2 + 256 * 1024, (t2, t20)      # tensors
    assert p20 <= 1.2 * p2 + 512 * 1024, (p2, p20)      # numpy / Python (per-video results are small)


def test_wflw_v_evaluation_holds_o_slots_frames(tiny, root):
    from ldeq_fast.video.evaluate import evaluate_video_methods, wflw_v_clips

    r, _ = root

    def run(n):
        (r / "split.txt").write_text("\n".join(f"{i:03d}" for i in range(n)))
        clips, skipped = wflw_v_clips(r, r / "split.txt", 128)
        assert len(clips) == n and not skipped
        rows, _ = evaluate_video_methods(tiny, clips, [], slots=2, prox_gamma=1.0, filters=())
        assert len(rows[0]["per_video_nme"]) == n

    run(2)                  # warm-up: one-time allocations (kernels, caches) out of the measurement
    _check(_peaks(lambda: run(2)), _peaks(lambda: run(20)))


def test_track_holds_o_slots_frames(tiny, root, tmp_path):
    from ldeq_fast.apps.track import run as cmd_track
    from ldeq_fast.cli import build_parser

    r, v = root
    box = ",".join(str(float(x)) for x in v.bboxes[0])

    def run(n):
        out = tmp_path / f"out{n}"
        args = build_parser().parse_args(["track", *[str(r / "videos" / f"{i:03d}.mp4") for i in range(n)],
                                          "--out", str(out), "--box", box, "--detector", "none", "--batch", "2",
                                          "--no-progress"])
        args.model = tiny
        assert cmd_track(args) == 0
        assert len(list(out.glob("*.mp4"))) == n

    run(2)
    _check(_peaks(lambda: run(2)), _peaks(lambda: run(20)))


def test_a_wflw_v_video_corrupt_part_way_is_dropped_from_every_method_and_named(tiny, root):
    from ldeq_fast.video.evaluate import evaluate_video_methods, wflw_v_clips

    r, _ = root
    data = (r / "videos" / "base.mp4").read_bytes()
    (r / "videos" / "cut.mp4").write_bytes(data[: int(len(data) * 0.8)])
    np.save(r / "landmarks" / "cut.npy", np.load(r / "landmarks" / "000.npy"))
    np.save(r / "bboxes" / "cut.npy", np.load(r / "bboxes" / "000.npy"))
    (r / "split_cut.txt").write_text("000\ncut\n001\n")
    clips, skipped = wflw_v_clips(r, r / "split_cut.txt", 128)
    assert len(clips) == 3 and not skipped            # annotations fine; the damage shows when decoding
    rows, _ = evaluate_video_methods(tiny, clips, [], slots=2, prox_gamma=1.0, filters=(), skipped=skipped)
    assert [vid for vid, _ in skipped] == ["cut"] and "'cut'" in skipped[0][1]
    assert all(len(row["per_video_nme"]) == 2 for row in rows)
