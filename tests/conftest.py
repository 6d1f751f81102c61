import os
import pathlib
import sys
import tempfile

import interpreter_child
import pytest
import torch

from ldeq_fast import _ext
from ldeq_fast.ops import cpu_kernels, require_native

REPO = pathlib.Path(__file__).resolve().parents[1]   # the checkout: bench/, ldeq_fast/assets/, .ci/
# the tests are grouped by area (tests/ops, solvers, model, video, data, apps) without packages; some import
# shared helpers from another area's test module (published checkpoints, blob images): every area is importable
for _area in ("ops", "solvers", "model", "video", "data", "apps"):
    sys.path.insert(0, str(REPO / "tests" / _area))

# Tests are small; at most the 2-core CI machine's threads keeps timings and results stable.
torch.set_num_threads(int(os.environ.get("LDEQ_FAST_TEST_THREADS", "2")))
# the CPU fast path's measured layout plans (ldeq_fast/model/cpu_tuning.py) go to a cache of this run's own, never
# the user's ~/.cache; child processes inherit it
os.environ.setdefault("LDEQ_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="ldeq_fast_test_cache_"))
# and outside tests/model/test_cpu_tuning.py (which measures plans into a cache of each test's own) the fast path runs
# its fixed layouts: a measured plan is chosen by timings and would be shared by every later test, so a test's
# numbers would hang on the machine's load and on which test ran first
os.environ.setdefault("LDEQ_FAST_CPU_TUNING", "off")


# tests of the fused C++ ops / the fast path on CPU: `from conftest import needs_cpp`, then `@needs_cpp`.  Under
# LDEQ_FAST_REQUIRE_NATIVE=1 (CI) they never skip: a missing or stale extension fails the session first.
needs_cpp = pytest.mark.skipif(not _ext.has_cpp(), reason=f"native extension not built: {_ext.missing_reason()}")


def pytest_configure(config):
    interpreter_child.register(config)  # on CPU the `triton` tests run in one TRITON_INTERPRET=1 child pytest


def pytest_sessionstart(session):
    """Under LDEQ_FAST_REQUIRE_NATIVE=1 (CI) what the fast path needs must be there: the C++ kernels and triton
    (the CUDA kernels, and on CPU the interpreter run of the Triton tests, which would otherwise all skip)."""
    if require_native():
        problems = []
        missing = [op for op, ok in cpu_kernels().items() if not ok]
        if missing:
            problems.append(f"the C++ kernels of {missing} are missing: {_ext.missing_reason()}")
        try:
            import triton  # noqa: F401, PLC0415
        except Exception as e:  # noqa: BLE001 - any failure to import it is the problem reported
            problems.append(f"triton cannot be imported: {type(e).__name__}: {e}")
        if problems:
            raise pytest.UsageError("LDEQ_FAST_REQUIRE_NATIVE=1 but " + "; ".join(problems))


# tests that use one of these fixtures run the Triton kernels; so do tests marked `triton` explicitly (e.g. a
# `backend` fixture's 'triton' param: pytest.param("triton", marks=pytest.mark.triton))
TRITON_FIXTURES = ("triton_kernels", "triton_interpret", "triton_loader")

# Triton picks the interpreter or GPU compilation when it is imported: on CPU the Triton tests run in the
# TRITON_INTERPRET=1 child run (tests/interpreter_child.py); with a GPU in-process on CUDA tensors
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


@pytest.fixture
def triton_loader(nan_empty):
    """``load_triton_kernels`` (kernel modules by name) where the Triton kernels can run, outputs NaN-filled."""
    from ldeq_fast.ops import load_triton_kernels, triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    if TRITON_DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py) or on a GPU")
    assert torch.empty(4, device=TRITON_DEVICE).isnan().all()
    return load_triton_kernels


def close_rel(got, want, tol, what, scale=0.0):
    """max |got - want| <= tol * max(max |want|, scale): ``scale`` is the quantity's natural size where the
    true value can be ~0 (the gradients of a one-element group); a NaN (an element not written) fails."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double().cpu(), want.double().cpu()
    assert not got.isnan().any(), f"{what}: NaN (an element not written)"
    err = ((got - want).abs().max() / want.abs().max().clamp_min(max(scale, 1e-12))).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:g}"


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the triton marker is added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        # the Triton tests run on CUDA tensors when there is a GPU (the GPU suite selects them with
        # -m "gpu or triton"), else in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py)
        if any(f in getattr(item, "fixturenames", ()) for f in TRITON_FIXTURES):
            item.add_marker("triton")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nan_empty():
    """Uninitialised tensors (torch.empty, at::empty inside the C++ kernels, the Triton launchers' outputs) come
    back NaN-filled, so any output element a kernel forgets to write fails the comparison.  warn_only: cuBLAS
    refuses deterministic mode without a fixed workspace on CUDA."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(prev)


@pytest.fixture
def one_thread():
    """Tiny tensors: on a shared 2-core machine OpenMP spin-waits make each small op ~10x slower with two
    threads.  Tests that compare thread counts set their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**over):
    """The smallest model of the published structure (19 landmarks, 64x64 images, widths 8): fast enough for
    bf16 emulation on a CPU without native bf16 and for the Triton interpreter."""
    from ldeq_fast import LDEQConfig

    base = dict(n_keypoints=19, injection_width=8, cell_base_width=8, cell_width_increment=4, heatmap_size=16,
                im_size=64, max_iters=4)
    return LDEQConfig.from_dict({**base, **over})


@pytest.fixture
def small_cfg():
    from ldeq_fast import LDEQConfig

    return LDEQConfig.small(backend="torch")


def contractive_map(B, D, dtype=torch.float64, scale=0.7, seed=0):
    """Per-sample f(z) = tanh(W_b z + c_b) with ||W_b||_2 = scale < 1, and its fixed point."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, D, D, generator=g, dtype=dtype)
    W = scale * W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.randn(B, D, generator=g, dtype=dtype)

    def f(z):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z.reshape(B, -1)) + c).reshape(z.shape)

    z = torch.zeros(B, D, dtype=dtype)
    for _ in range(3000):
        z = f(z)
    return f, z, (W, c)
