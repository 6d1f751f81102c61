"""The Triton tests on a machine without a GPU: one TRITON_INTERPRET=1 child pytest per session.

Triton chooses between the interpreter and GPU compilation when it is first imported, so on CPU the tests
marked ``triton`` cannot run in the parent process.  This plugin (registered by tests/conftest.py) runs all of
the session's selected ``triton`` tests once, together, in a child ``python -m pytest`` with TRITON_INTERPRET=1,
and each of those items in the parent reports the child's outcome for the same test id: passed if the child
passed it, failed with the child's message if it failed, and failed too if it skipped there or did not run
(a Triton test that does not run is not a pass).  The parent's summary so counts them one by one.

On a GPU the ``triton`` tests run in-process on CUDA tensors and nothing is delegated.  In the child (it is
itself under TRITON_INTERPRET=1) the plugin records each test's outcome into the JSON file named by
``LDEQ_FAST_CHILD_RESULTS``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

RESULTS_ENV = "LDEQ_FAST_CHILD_RESULTS"
TIMEOUT_ENV = "LDEQ_FAST_INTERPRETER_TIMEOUT"  # seconds for the whole child run
MARKER = "triton"


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def delegates(item) -> bool:
    """The parent on a CPU machine delegates the Triton tests (not the CUDA-device ones, which skip here)."""
    return item.get_closest_marker(MARKER) is not None and item.get_closest_marker("gpu") is None


class Parent:
    """Runs the child once (at the first delegated item) and reports its outcomes item by item."""

    def __init__(self, config):
        self.config = config
        self.delegated: list = []
        self.delegated_ids: set[str] = set()
        self.results: dict | None = None   # nodeid -> {"outcome", "message", "duration"}
        self.failure: str | None = None    # why the child run as a whole gave no results

    def pytest_collection_finish(self, session):
        self.delegated = [item for item in session.items if delegates(item)]
        self.delegated_ids = {item.nodeid for item in self.delegated}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if item.nodeid not in self.delegated_ids:
            return None
        if self.results is None and self.failure is None:
            self._run_child()
        outcome, message, duration = self._outcome(item.nodeid)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        keywords = {k: 1 for k in item.keywords}
        for when, out, longrepr, dur in (("setup", "passed", None, 0.0), ("call", outcome, message, duration),
                                         ("teardown", "passed", None, 0.0)):
            report = pytest.TestReport(item.nodeid, item.location, keywords, out, longrepr, when, duration=dur)
            ihook.pytest_runtest_logreport(report=report)
        # what pytest's own teardown does: finish the fixtures and collectors (module, class) the next item does
        # not share, which earlier in-process tests set up (else the next module's first test errors in setup)
        item.session._setupstate.teardown_exact(nextitem)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _outcome(self, nodeid: str):
        if self.failure is not None:
            return "failed", self.failure, 0.0
        got = self.results.get(nodeid)
        if got is None:
            return "failed", "did not run in the TRITON_INTERPRET=1 child run", 0.0
        if got["outcome"] == "passed":
            return "passed", None, got["duration"]
        if got["outcome"] == "skipped":
            return "failed", f"skipped in the TRITON_INTERPRET=1 child run: {got['message']}", got["duration"]
        return "failed", f"[TRITON_INTERPRET=1 child run]\n{got['message']}", got["duration"]

    def _run_child(self) -> None:
        root = str(self.config.rootpath)
        fd, path = tempfile.mkstemp(prefix="ldeq_fast_triton_child_", suffix=".json")
        os.close(fd)
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", LDEQ_FAST_TEST_THREADS="1",
                   **{RESULTS_ENV: path})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", root,
               *(item.nodeid for item in self.delegated)]
        timeout = float(os.environ.get(TIMEOUT_ENV, "1800"))
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n[interpreter child] {len(self.delegated)} Triton tests under TRITON_INTERPRET=1 ...")
        start, tail = time.perf_counter(), ""
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            tail = (proc.stdout + proc.stderr)[-6000:]
            with open(path) as fh:
                self.results = json.load(fh)
            # 0: all passed, 1: some failed (reported per test); anything else (usage error, interrupted, nothing
            # collected, crash) fails every delegated test with the child's output
            if proc.returncode not in (0, 1):
                self.failure = f"the TRITON_INTERPRET=1 child run exited with {proc.returncode}:\n{tail}"
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            self.failure = f"the TRITON_INTERPRET=1 child run took over {timeout:.0f} s ({TIMEOUT_ENV}):\n{out[-6000:]}"
        except (OSError, ValueError) as e:  # no results file, or a truncated one: the child died
            self.failure = f"the TRITON_INTERPRET=1 child run left no results ({e}):\n{tail}"
        finally:
            if os.path.exists(path):
                os.unlink(path)
        if reporter is not None:
            reporter.write_line(f"[interpreter child] done in {time.perf_counter() - start:.0f} s")


class Child:
    """In the child: each test's outcome (the worst of its phases) and message, written at the session's end."""

    def __init__(self, path: str):
        self.path = path
        self.results: dict = {}

    def pytest_runtest_logreport(self, report):
        have = self.results.get(report.nodeid)
        if report.failed:
            message = report.longreprtext or f"failed in {report.when}"
            if report.when != "call":
                message = f"error in {report.when}:\n{message}"
            self.results[report.nodeid] = {"outcome": "failed", "message": message, "duration": report.duration}
        elif report.skipped and (have is None or have["outcome"] == "passed"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            self.results[report.nodeid] = {"outcome": "skipped", "message": reason, "duration": report.duration}
        elif report.when == "call" and report.passed and have is None:
            self.results[report.nodeid] = {"outcome": "passed", "message": None, "duration": report.duration}

    def pytest_sessionfinish(self, session):
        with open(self.path, "w") as fh:
            json.dump(self.results, fh)


def register(config) -> None:
    """Called from conftest's pytest_configure."""
    if interpreted():
        path = os.environ.get(RESULTS_ENV)
        if path:
            config.pluginmanager.register(Child(path), "ldeq_fast_interpreter_child")
    elif not torch.cuda.is_available():
        from ldeq_fast.ops import triton_available  # noqa: PLC0415

        if triton_available():   # without triton the Triton tests skip (or, under REQUIRE_NATIVE, the session fails)
            config.pluginmanager.register(Parent(config), "ldeq_fast_interpreter_parent")
