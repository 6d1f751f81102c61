"""pytest-benchmark versions of bench/bench_solver.py (small sizes by default).

    python -m pytest bench/test_bench_solver.py --benchmark-enable                   # B=2, D=98*16*16
    LDEQ_BENCH_FULL=1 python -m pytest bench/test_bench_solver.py --benchmark-enable # B=8, D=98*64*64

Each benchmark also checks its answer against the reference solver, so a fast wrong kernel fails.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_solver import cheap_map, solvers  # noqa: E402

from ldeq_fast import _ext  # noqa: E402
from ldeq_fast.ops.anderson import resolve_backend  # noqa: E402

FULL = os.environ.get("LDEQ_BENCH_FULL") == "1"
B, D = (8, 98 * 64 * 64) if FULL else (2, 98 * 16 * 16)
ITERS = 12 if FULL else 6


@pytest.fixture(scope="module")
def problem():
    f = cheap_map(B, D, "cpu", torch.float32)
    z0 = torch.zeros(B, D)
    methods = solvers(resolve_backend(z0), m=6, lam=1e-4)
    z_ref = methods["reference"](f, z0, ITERS, 0.0)
    return f, z0, methods, z_ref


def _bench(benchmark, problem, name, tol, max_iter):
    f, z0, methods, z_ref = problem
    if name not in methods:
        pytest.skip(f"{name} not available (torchdeq not installed?)")
    z = benchmark(methods[name], f, z0, max_iter, tol)
    return z, z_ref


def test_f_alone(benchmark, problem):
    f, z0, _, _ = problem
    benchmark(f, z0)


@pytest.mark.parametrize("name", ["fused", "reference", "torchdeq"])
def test_fixed_iterations(benchmark, problem, name):
    if name == "fused" and not _ext.has_cpp():
        pytest.skip("C++ extension not built: 'fused' would run the PyTorch ops")
    z, z_ref = _bench(benchmark, problem, name, 0.0, ITERS)
    # torchdeq runs a different schedule (X1 = f(X0) first), so only the fused path must match exactly
    rtol = 1e-5 if name != "torchdeq" else 1e-3
    assert ((z - z_ref).norm() / z_ref.norm()).item() < rtol


@pytest.mark.parametrize("name", ["fused", "reference", "torchdeq"])
def test_to_tolerance(benchmark, problem, name):
    if name == "fused" and not _ext.has_cpp():
        pytest.skip("C++ extension not built: 'fused' would run the PyTorch ops")
    f, z0, methods, _ = problem
    z, _ = _bench(benchmark, problem, name, 1e-5, 50)
    z_tight = methods["reference"](f, z0, 60, 1e-7)
    assert ((z - z_tight).norm() / z_tight.norm()).item() < 1e-4
