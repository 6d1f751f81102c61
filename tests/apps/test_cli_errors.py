"""Every ``ldeq-fast`` subcommand reports a bad input as one line, ``ldeq-fast <command>: error: <what>``, on
stderr with a non-zero exit status and no traceback; ``--debug`` / ``LDEQ_FAST_DEBUG=1`` show the traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest


def _cli(*args, env=None):
    e = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env or {}))
    if "LDEQ_FAST_DEBUG" not in (env or {}):
        e.pop("LDEQ_FAST_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ldeq_fast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=e)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import cv2

    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "corrupt.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cv2.imwrite(str(d / "blank.png"), np.zeros((32, 32, 3), np.uint8))
    (d / "text.mp4").write_text("not a video\n")
    return d


def _one_line_error(proc, command, *names):
    err = proc.stderr
    assert proc.returncode != 0, (proc.stdout, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ldeq-fast {command}: error: "), err
    for n in names:
        assert str(n) in lines[0], (n, err)
    return lines[0]


CASES = {   # id: (command, arguments (FILES: the fixture's folder), what the line must name, exit status)
    "bench-missing-model": ("bench", ["--accuracy", "--model", "FILES/missing.pt"], ["FILES/missing.pt"], 1),
    "bench-corrupt-model": ("bench", ["--accuracy", "--model", "FILES/corrupt.pt"], ["FILES/corrupt.pt", "corrupt"], 1),
    "fit-init-corrupt-model": ("fit-init", ["--model", "FILES/corrupt.pt", "--synthetic", "4"], ["FILES/corrupt.pt"], 1),
    "fit-init-usage": ("fit-init", ["--model", "demo"], ["exactly one of"], 2),
    "train-bad-type": ("train", ["--set", "steps=abc"], ["steps", "'abc'"], 1),
    "train-unknown-key": ("train", ["--set", "stepz=3"], ["stepz"], 1),
    "train-bad-model-key": ("train", ["--set", "model.max_iterz=3"], ["max_iterz"], 1),
    "train-missing-config": ("train", ["--config", "FILES/missing.json"], ["FILES/missing.json"], 1),
    "train-unknown-flag": ("train", ["--bogus"], ["--bogus"], 2),
    "video-missing-model": ("video", ["--model", "FILES/missing.pt", "--no-progress"], ["FILES/missing.pt"], 1),
    "predict-missing-image": ("predict", ["FILES/missing.png", "--out", "FILES/o"], ["FILES/missing.png"], 1),
    "predict-corrupt-model": ("predict", ["FILES/blank.png", "--out", "FILES/o", "--model", "FILES/corrupt.pt"],
                              ["FILES/corrupt.pt"], 1),
    "predict-no-face": ("predict", ["FILES/blank.png", "--out", "FILES/o", "--no-progress"],
                        ["FILES/blank.png", "no face"], 1),
    "track-missing-video": ("track", ["FILES/missing.mp4", "--out", "FILES/o"], ["FILES/missing.mp4"], 1),
    "track-not-a-video": ("track", ["FILES/text.mp4", "--out", "FILES/t", "--detector", "none", "--no-progress"],
                          ["FILES/text.mp4", "not a readable video"], 1),
    "export-corrupt-checkpoint": ("export", ["--onnx", "FILES/x.onnx", "--checkpoint", "FILES/corrupt.pt"],
                                  ["FILES/corrupt.pt"], 1),
    "export-usage": ("export", ["--onnx", "FILES/x.onnx", "--checkpoint", "FILES/corrupt.pt", "--small"],
                     ["--small"], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line(files, case):
    command, args, names, status = CASES[case]
    args, names = ([s.replace("FILES", str(files)) for s in x] for x in (args, names))
    proc = _cli(command, *args)
    _one_line_error(proc, command, *names)
    assert proc.returncode == status, proc.stderr


def test_every_subcommand_is_covered():
    from ldeq_fast.cli import build_parser

    assert set(build_parser().commands) == {command for command, *_ in CASES.values()}


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_the_traceback(files, how):
    args = ["predict", files / "blank.png", "--out", files / "o", "--model", files / "missing.pt"]
    proc = (_cli("--debug", *args) if how == "flag-before" else _cli(*args, "--debug") if how == "flag-after"
            else _cli(*args, env={"LDEQ_FAST_DEBUG": "1"}))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("ldeq_fast.model.checkpoint.CheckpointError: ")


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, capsys):
    """A bug (here: a KeyError from a command) is not an expected error: main lets it through."""
    import ldeq_fast.apps.train as app
    from ldeq_fast.cli import main

    def bug(a):
        raise KeyError("a bug")

    monkeypatch.setattr(app, "run", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["train"])


def test_which_errors_are_expected():
    from ldeq_fast.apps.common import UsageError, is_expected
    from ldeq_fast.config import ConfigError
    from ldeq_fast.images import ImageError
    from ldeq_fast.model.checkpoint import CheckpointError
    from ldeq_fast.video.evaluate import ClipError
    from ldeq_fast.video.io import VideoReadError

    expected = [UsageError("x"), ConfigError("x"), ImageError("x"), CheckpointError("x"), ClipError({0: "x"}),
                VideoReadError("v.mp4", 3, "x"), FileNotFoundError("x"), ModuleNotFoundError("x"), ValueError("x")]
    assert all(map(is_expected, expected))
    assert not any(map(is_expected, [KeyError("x"), RuntimeError("x"), AttributeError("x"), IndexError("x")]))
