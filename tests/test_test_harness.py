"""The test harness itself: CI (LDEQ_FAST_REQUIRE_NATIVE=1) refuses to start without what the fast path needs,
and the TRITON_INTERPRET=1 child run (tests/interpreter_child.py) reports each delegated test by its own
outcome, counting a skip or a test that did not run there as a failure."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _env(**over):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    env.update(over)
    return env


def test_require_native_fails_the_session_without_triton(tmp_path):
    """With triton unimportable (a sitecustomize that blocks it) and LDEQ_FAST_REQUIRE_NATIVE=1, pytest stops at
    session start naming triton, before collecting anything."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None  # import triton fails\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(TESTS, "model", "test_config.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env(PYTHONPATH=path, LDEQ_FAST_REQUIRE_NATIVE="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert "LDEQ_FAST_REQUIRE_NATIVE=1 but" in out and "triton cannot be imported" in out, out[-3000:]
    assert " passed" not in out
    # the same session without the flag starts (the shim really is the only difference)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           os.path.join(TESTS, "model", "test_config.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env(PYTHONPATH=path, LDEQ_FAST_REQUIRE_NATIVE="0"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


CONFTEST = f"""
import sys
sys.path.insert(0, {TESTS!r})
import interpreter_child

def pytest_configure(config):
    config.addinivalue_line("markers", "triton: a Triton test")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    interpreter_child.register(config)
"""

PROBE = """
import os
import pytest

CHILD = os.environ.get("TRITON_INTERPRET") == "1"

@pytest.mark.triton
def test_passes_in_child():
    assert CHILD

@pytest.mark.triton
def test_fails_in_child():
    assert not CHILD, "boom in the child"

@pytest.mark.triton
def test_skips_in_child():
    if CHILD:
        pytest.skip("nothing to see")

def test_runs_in_parent():
    assert not CHILD
"""

MISSING = """
import os
import pytest

CHILD = os.environ.get("TRITON_INTERPRET") == "1"

@pytest.mark.triton
@pytest.mark.parametrize("x", [1] if CHILD else [1, 2])   # test_param[2] does not exist in the child
def test_param(x):
    assert CHILD
"""


def _parent_run(tmp_path, source):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(source))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path / "test_probe.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=_env(CUDA_VISIBLE_DEVICES=""))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the triton tests run in-process")
def test_child_outcomes_count_one_by_one(tmp_path):
    pytest.importorskip("triton")
    rc, out = _parent_run(tmp_path, PROBE)
    assert rc == 1, out
    assert "1 failed" not in out and "2 failed, 2 passed" in out, out     # one child pass + the parent's own test
    assert "PASSED test_probe.py::test_passes_in_child" in out and "PASSED test_probe.py::test_runs_in_parent" in out
    assert "FAILED test_probe.py::test_fails_in_child" in out and "boom in the child" in out
    assert "FAILED test_probe.py::test_skips_in_child" in out
    assert "skipped in the TRITON_INTERPRET=1 child run: nothing to see" in out
    assert out.count("[interpreter child] 3 Triton tests") == 1           # one child run for all of them


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the triton tests run in-process")
def test_child_that_does_not_run_fails_every_test(tmp_path):
    pytest.importorskip("triton")
    rc, out = _parent_run(tmp_path, MISSING)
    assert rc == 1, out
    assert "2 failed" in out and " passed" not in out, out
    assert "the TRITON_INTERPRET=1 child run exited with 4" in out and "not found" in out, out


FIRST_MODULE = """
import os
import pytest

CHILD = os.environ.get("TRITON_INTERPRET") == "1"

@pytest.fixture(scope="module")
def module_state():
    yield "set up"

def test_in_parent_with_a_module_fixture(module_state):
    assert module_state == "set up"

@pytest.mark.triton
def test_last_of_its_module_in_child():
    assert CHILD
"""

SECOND_MODULE = """
def test_first_of_the_next_module():
    pass
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the triton tests run in-process")
def test_a_delegated_test_last_in_its_module_tears_the_module_down(tmp_path):
    """A module whose last test ran in the child is torn down as pytest would (its module fixtures finished), so
    the next module's first test sets up cleanly instead of erroring with 'previous item was not torn down'."""
    pytest.importorskip("triton")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(FIRST_MODULE))
    (tmp_path / "test_zz_second.py").write_text(textwrap.dedent(SECOND_MODULE))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path / "test_probe.py"), str(tmp_path / "test_zz_second.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(CUDA_VISIBLE_DEVICES=""))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "3 passed" in out and "error" not in out.lower(), out
