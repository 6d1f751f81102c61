import numpy as np
import pytest

from ldeq_fast.video.io import FrameReader, LandmarkCSV, VideoReadError, VideoWriter, list_videos, probe_video

pytest.importorskip("av")


def _frames(n, h, w, seed=0):
    import cv2

    rng = np.random.default_rng(seed)     # smooth colours: 4:2:0 chroma keeps them
    base = cv2.resize(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return [np.roll(base, 3 * t, axis=1) for t in range(n)]


@pytest.mark.parametrize("hw", [(48, 64), (47, 63)])
def test_write_read_round_trip_keeps_count_size_and_content(tmp_path, hw):
    frames = _frames(12, *hw)
    w = VideoWriter(tmp_path / "v.mp4", 25, hw[1], hw[0], crf=10)
    for f in frames:
        w.write(f)
    assert not (tmp_path / "v.mp4").exists()          # written under .part until closed
    w.close()
    info = probe_video(tmp_path / "v.mp4")
    assert info["frames"] == 12 and (info["height"], info["width"]) == hw and abs(info["fps"] - 25) < 1e-6
    got = list(FrameReader(tmp_path / "v.mp4", prefetch=2))
    assert len(got) == 12 and got[0].shape == (*hw, 3) and got[0].dtype == np.uint8
    err = [np.abs(got[5].astype(int) - frames[k]).mean() for k in (4, 5, 6)]
    assert err[1] < 10 and err[1] < 0.5 * min(err[0], err[2])      # lossy chroma, but frame 5 in place 5
    with pytest.raises(ValueError, match="frame of size"):
        VideoWriter(tmp_path / "x.mp4", 25, 64, 48).write(np.zeros((10, 10, 3), np.uint8))


def _written(tmp_path, n=30):
    w = VideoWriter(tmp_path / "full.mp4", 30, 64, 48)
    for f in _frames(n, 48, 64):
        w.write(f)
    w.close()
    return tmp_path / "full.mp4"


def test_truncated_video_yields_the_frames_that_decode_then_names_file_and_frame(tmp_path):
    full = _written(tmp_path)
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.8)])    # into the media data: the header (index) is up front
    got = []
    with pytest.raises(VideoReadError) as e:
        for f in FrameReader(cut):
            got.append(f)
    assert 0 < len(got) < 30
    assert e.value.frame == len(got) and str(cut) in str(e.value) and f"frame {len(got)}" in str(e.value)


def test_unreadable_files(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(VideoReadError, match="notes.mp4: cannot be opened"):
        FrameReader(tmp_path / "notes.mp4")
    with pytest.raises(VideoReadError, match="no such file"):
        FrameReader(tmp_path / "missing.mp4")
    assert probe_video(tmp_path / "notes.mp4") is None
    with pytest.raises(FileNotFoundError, match="missing"):
        list_videos([tmp_path / "missing"])


def test_abandoned_reader_stops_its_thread(tmp_path):
    full = _written(tmp_path)
    r = FrameReader(full, prefetch=1)
    it = iter(r)
    next(it)
    it.close()
    assert not r._thread.is_alive()


def test_landmark_csv(tmp_path):
    c = LandmarkCSV(tmp_path / "l.csv")
    c.write(0, np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, 0.25]), np.array([0, 0, 10, 10]), "given")
    c.write(1, None, None, None)
    assert not (tmp_path / "l.csv").exists()
    c.close()
    lines = (tmp_path / "l.csv").read_text().splitlines()
    assert lines[0].startswith("frame,landmark,x,y,uncertainty,box_x1")
    assert lines[1] == "0,0,1.000,2.000,0.500,0.00,0.00,10.00,10.00,given"
    assert lines[3].startswith("1,-1,,,")
