"""Makes docs/track_frame.png, the README's still of an annotated `ldeq-fast track` output:

    python docs/make_track_still.py

A synthetic "hard" clip (the shipped demo model is trained on synthetic faces) is written as an mp4, tracked
by `ldeq-fast track` from its first frame's box with the uncertainty drawn, and one frame of the annotated
mp4 is saved.
"""
import sys
import tempfile
from pathlib import Path

import cv2

from ldeq_fast.cli import main
from ldeq_fast.data.synthetic import make_video
from ldeq_fast.video.io import FrameReader, VideoWriter

FRAME = 40


def run(out_png: Path) -> None:
    v = make_video(7, 48, size=128, difficulty="hard", frame_hw=(270, 360))
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        w = VideoWriter(clip, 30, v.frames.shape[2], v.frames.shape[1], crf=12)
        for f in v.frames:
            w.write(f)
        w.close()
        box = ",".join(f"{x:.1f}" for x in v.bboxes[0])
        rc = main(["track", str(clip), "--out", tmp, "--box", box, "--detector", "none", "--uncertainty",
                   "--no-progress"])
        if rc:
            raise SystemExit(rc)
        frame = list(FrameReader(Path(tmp) / "clip.mp4"))[FRAME]
    cv2.imwrite(str(out_png), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {out_png}")


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "track_frame.png")
