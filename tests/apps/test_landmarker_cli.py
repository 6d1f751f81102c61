"""`ldeq-fast predict` and `ldeq-fast track`: outputs, bad inputs, rank sharding."""
import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ldeq_fast import metrics
from ldeq_fast.cli import main
from ldeq_fast.data.synthetic import make_video
from ldeq_fast.landmark_files import output_names
from ldeq_fast.video.io import FrameReader, VideoWriter, probe_video

pytest.importorskip("av")


def write_mp4(path, frames):
    w = VideoWriter(path, 25.0, frames.shape[2], frames.shape[1], crf=12)
    for f in frames:
        w.write(f)
    w.close()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    v = make_video(3, 10, size=128, difficulty="normal")
    return write_mp4(tmp_path_factory.mktemp("v") / "face.mp4", v.frames), v


def _box(b):
    return ",".join(f"{x:.2f}" for x in b)


def test_track_writes_video_npz_csv_and_summary(video, tmp_path):
    path, v = video
    out = tmp_path / "out"
    rc = main(["track", str(path), "--model", "demo", "--out", str(out), "--box", _box(v.bboxes[0]),
               "--detector", "none", "--uncertainty", "--no-progress"])
    assert rc == 0
    info = probe_video(out / "face.mp4")
    assert info["frames"] == 10 and (info["width"], info["height"]) == (v.frames.shape[2], v.frames.shape[1])
    assert abs(info["fps"] - 25.0) < 1e-6
    annotated = list(FrameReader(out / "face.mp4"))
    assert len(annotated) == 10 and np.abs(annotated[3].astype(int) - v.frames[3]).mean() > 0.5   # drawn on
    z = np.load(out / "face.npz")
    assert z["landmarks"].shape == (10, 98, 2) and z["uncertainty"].shape == (10, 98) and z["face"].all()
    assert z["box_source"][0] == "given" and set(z["box_source"][1:]) == {"landmarks"}
    assert metrics.video_nme(z["landmarks"], v.landmarks) < 5.0
    with open(out / "face.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 * 98
    assert list(rows[0]) == ["frame", "landmark", "x", "y", "uncertainty", "box_x1", "box_y1", "box_x2", "box_y2",
                             "box_source"]
    r = rows[7 * 98 + 54]
    assert (int(r["frame"]), int(r["landmark"])) == (7, 54)
    np.testing.assert_allclose([float(r["x"]), float(r["y"])], z["landmarks"][7, 54], atol=1e-3)
    np.testing.assert_allclose(float(r["uncertainty"]), z["uncertainty"][7, 54], atol=1e-3)
    np.testing.assert_allclose([float(r[k]) for k in ("box_x1", "box_y1", "box_x2", "box_y2")], z["box"][7], atol=1e-2)
    s = json.loads((out / "face.json").read_text())
    assert s["frames"] == 10 and s["frames_without_face"] == 0 and s["error"] is None and s["mode"] == "prox"
    assert s["cell_evals_per_frame"] < 3 and s["frames_per_s"] > 0 and s["resets"] == 0
    run = json.loads((out / "summary.json").read_text())
    assert run["frames"] == 10 and run["machine"]["cores"] >= 1 and run["frames_without_face"] == 0
    assert not list(out.glob("*.part"))


def test_a_corrupt_video_among_others_keeps_its_frames_and_the_rest_finish(video, tmp_path):
    path, v = video
    data = path.read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.mp4").write_bytes(data[: int(len(data) * 0.8)])
    (tmp_path / "in" / "good.mp4").write_bytes(data)
    (tmp_path / "in" / "notes.mp4").write_text("not a video")
    out = tmp_path / "out"
    rc = main(["track", str(tmp_path / "in"), "--out", str(out), "--box", _box(v.bboxes[0]), "--detector", "none",
               "--no-progress", "--batch", "3"])
    assert rc == 1
    good = json.loads((out / "good.json").read_text())
    assert good["frames"] == 10 and good["error"] is None
    cut = json.loads((out / "cut.json").read_text())
    assert 0 < cut["frames"] < 10 and cut["error_frame"] == cut["frames"]
    assert "cut.mp4: frame" in cut["error"]
    assert np.load(out / "cut.npz")["landmarks"].shape[0] == cut["frames"]
    assert probe_video(out / "cut.mp4")["frames"] == cut["frames"]          # flushed, playable
    bad = json.loads((out / "notes.json").read_text())
    assert bad["frames"] == 0 and "cannot be opened" in bad["error"]
    assert len(json.loads((out / "summary.json").read_text())["errors"]) == 2


def test_ranks_shard_the_files_and_write_their_own(video, tmp_path):
    path, v = video
    vids = []
    for i in range(3):
        d = tmp_path / f"d{i}"
        d.mkdir()
        vids.append(d / "clip.mp4")                    # the same stem: output names get the folder
        vids[-1].write_bytes(path.read_bytes())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ldeq_fast.cli", "track", *map(str, vids), "--out", str(out), "--box",
           _box(v.bboxes[0]), "--detector", "none", "--no-progress", "--no-video"]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    s0 = json.loads((out / "summary.rank0.json").read_text())
    s1 = json.loads((out / "summary.rank1.json").read_text())
    assert [x["video"] for x in s0["videos"]] == [str(vids[0]), str(vids[2])]
    assert [x["video"] for x in s1["videos"]] == [str(vids[1])]
    assert s0["world_size"] == 2 and s1["rank"] == 1
    names = sorted(p.name for p in out.glob("*.npz"))
    assert names == ["d0__clip.npz", "d1__clip.npz", "d2__clip.npz"]
    a, b = np.load(out / "d0__clip.npz")["landmarks"], np.load(out / "d1__clip.npz")["landmarks"]
    assert np.abs(a - b).max() < 1e-3                     # the same video on two ranks: the same landmarks
    assert not (out / "d0__clip.mp4").exists()


def test_output_names_are_distinct():
    assert output_names(["a/x.mp4", "b/x.mp4", "y.mp4"]) == ["a__x", "b__x", "y"]
    assert output_names(["x.mp4", "x.mp4"]) == ["x", "x-1"]


def test_predict_writes_annotated_images_json_and_csv(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    d = tmp_path / "photos"
    d.mkdir()
    cv2.imwrite(str(d / "astronaut.jpg"), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "grey16.png"), (cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257))
    cv2.imwrite(str(d / "wall.png"), np.full((200, 300, 3), 90, np.uint8))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    assert main(["predict", str(d), "--out", str(out), "--no-progress"]) == 0
    res = {os.path.basename(r["image"]): r for r in json.loads((out / "landmarks.json").read_text())["results"]}
    assert res["astronaut.jpg"]["error"] is None and len(res["astronaut.jpg"]["faces"][0]["landmarks"]) == 98
    assert res["grey16.png"]["error"] is None and res["grey16.png"]["faces"][0]["box_source"] == "haar"
    assert "no face found" in res["wall.png"]["error"]
    assert "broken.jpg: not a readable image" in res["broken.jpg"]["error"]
    eye = np.array(res["astronaut.jpg"]["faces"][0]["landmarks"][96])        # left pupil (image left)
    assert np.abs(eye - [198, 100]).max() < 15
    with open(out / "landmarks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 98 + 2 and list(rows[0])[:3] == ["image", "face", "landmark"]
    assert (out / "astronaut.png").is_file() and not (out / "wall.png").exists()
