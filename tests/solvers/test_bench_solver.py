"""bench/bench_solver.py's solver wrappers and its agreement gate: the fused solver against the reference on the
bench's own maps, so the figures it times are of solvers that give the right answer.

(Was bench/test_bench_solver.py, outside testpaths, where the reference was compared with itself.)"""
import sys

import pytest
import torch
from conftest import REPO, needs_cpp

sys.path.insert(0, str(REPO / "bench"))
from bench_solver import AGREEMENT_RTOL, agreement, cheap_map, solvers  # noqa: E402

from ldeq_fast.ops.anderson import resolve_backend  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_cpp]
B, D, ITERS = 2, 98 * 16 * 16, 6
LIPSCHITZ = 0.5   # cheap_map: z -> 0.5 tanh(z) + c


def _maps():
    """The bench's map in float32 and the same map (the same c) in float64."""
    f32 = cheap_map(B, D, "cpu", torch.float32)
    c = f32(torch.zeros(B, D)).double()     # 0.5 tanh(0) + c

    def f64(z):
        return 0.5 * torch.tanh(z) + c
    return f32, f64


def _methods():
    return solvers(resolve_backend(torch.zeros(1)), m=6, lam=1e-4)


def test_fused_matches_reference_at_fixed_iterations():
    # the same iteration count, so the same answer up to fp32 rounding: within 2x the reference's own fp32
    # distance from its float64 run (+ a few ulps of |z| ~ 1)
    m = _methods()
    z0 = torch.zeros(B, D)
    f32, f64 = _maps()
    ref32 = m["reference"](f32, z0, ITERS, 0.0)
    ref64 = m["reference"](f64, z0.double(), ITERS, 0.0)
    fused = m["fused"](f32, z0, ITERS, 0.0)
    rounding = (ref32.double() - ref64).abs().max().item()
    assert (fused.double() - ref64).abs().max().item() <= 2 * rounding + 1e-6


@pytest.mark.parametrize("tol", [1e-4, 1e-5])
def test_fused_to_tolerance_is_that_close_to_the_fixed_point(tol):
    # a map with Lipschitz constant L: |z - z*| <= |f(z) - z| / (1 - L), and the solver stops at
    # |f(z) - z| / |f(z)| < tol per sample (fp32 evaluation of that residual: ~1e-7 relative)
    f32, f64 = _maps()
    z = _methods()["fused"](f32, torch.zeros(B, D), 50, tol).double()
    exact = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(80):    # contraction 0.5: 2^-80, exact in float64
        exact = f64(exact)
    fz = f64(z)
    resid = (fz - z).norm(dim=1)
    assert (resid / fz.norm(dim=1) <= tol + 1e-6).all(), resid / fz.norm(dim=1)
    assert ((z - exact).norm(dim=1) <= resid / (1 - LIPSCHITZ) + 1e-5).all()


def test_agreement_gate_passes_for_the_fused_solver_and_catches_a_wrong_one():
    m = _methods()
    f, z0 = cheap_map(B, D, "cpu", torch.float32), torch.zeros(B, D)
    rel = agreement({k: m[k] for k in ("fused", "reference")}, f, z0)
    assert set(rel) == {"fused"} and rel["fused"] <= AGREEMENT_RTOL
    wrong = {"reference": m["reference"], "fused": lambda f, z0, it, tol: m["fused"](f, z0, 2, tol)}
    assert agreement(wrong, f, z0)["fused"] > AGREEMENT_RTOL
