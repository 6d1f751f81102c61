import pytest
import torch
from conftest import contractive_map

from ldeq_fast.solvers import solve

METHODS = ["anderson", "fpi", "broyden"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("B,D", [(1, 1), (3, 37), (8, 101)])
def test_converges_to_known_fixed_point(method, B, D):
    f, z_true, _ = contractive_map(B, D)
    z, st = solve(f, torch.zeros(B, D, dtype=torch.float64), method=method, max_iter=200, tol=1e-11,
                  backend="torch")
    assert st.converged.all() and not st.diverged.any()
    assert torch.allclose(z, z_true, atol=1e-9)
    assert (st.best_residual < 1e-11).all()
    assert st.trace.shape == (200, B)


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance(method):
    B, D = 8, 53
    f, z_true, (W, c) = contractive_map(B, D, dtype=torch.float32, scale=0.9, seed=3)
    z0 = torch.randn(B, D) * 0.1
    z0[2] = z_true[2]                           # sample 2 starts at its fixed point
    z, st = solve(f, z0, method=method, max_iter=40, tol=1e-4, backend="torch")
    for i in (0, 5):
        def fi(v, i=i):
            return torch.tanh(torch.einsum("bij,bj->bi", W[i:i + 1], v) + c[i:i + 1])

        zi, sti = solve(fi, z0[i:i + 1], method=method, max_iter=40, tol=1e-4, backend="torch")
        assert torch.allclose(z[i:i + 1], zi, atol=1e-6, rtol=0)
        assert st.nstep[i] == sti.nstep[0]
    # samples stop independently: sample 2 is done after one evaluation, the others are not
    assert st.nstep[2] == 1 and (st.nstep[[0, 1, 3]] > 1).all()


@pytest.mark.parametrize("method", METHODS)
def test_max_iter_one_returns_f_of_z0(method):
    f, _, _ = contractive_map(3, 11)
    z0 = torch.randn(3, 11, dtype=torch.float64)
    z, st = solve(f, z0, method=method, max_iter=1, tol=0.0, backend="torch")
    assert torch.equal(z, f(z0))
    assert (st.nstep == 1).all()


def test_max_iter_two_returns_best_not_z0():
    f, z_true, _ = contractive_map(2, 9)
    z0 = torch.zeros(2, 9, dtype=torch.float64)
    z, st = solve(f, z0, method="anderson", max_iter=2, tol=0.0, backend="torch")
    x1 = f(z0)
    assert torch.allclose(z, f(x1))        # x1 = f(z0) has the lower residual; its image is returned
    assert ((z - z_true).norm(dim=1) < (z0 - z_true).norm(dim=1)).all()


def test_nan_sample_is_frozen_and_flagged():
    f, z_true, _ = contractive_map(3, 7)

    def g(z):
        out = f(z)
        out[1] = float("nan")
        return out

    z, st = solve(g, torch.zeros(3, 7, dtype=torch.float64), method="anderson", max_iter=50, tol=1e-10,
                  backend="torch")
    assert st.diverged.tolist() == [False, True, False]
    assert st.converged[0] and st.converged[2]
    assert st.nstep[1] == 1
    assert torch.allclose(z[[0, 2]], z_true[[0, 2]], atol=1e-8)


def test_scaled_lambda_beats_absolute_at_tight_tolerance():
    f, _, _ = contractive_map(2, 64, dtype=torch.float64, scale=0.95, seed=1)
    z0 = torch.zeros(2, 64, dtype=torch.float64)
    _, s_abs = solve(f, z0, method="anderson", max_iter=200, tol=1e-10, lam_mode="absolute", backend="torch")
    _, s_sc = solve(f, z0, method="anderson", max_iter=200, tol=1e-10, lam_mode="scaled", backend="torch")
    assert s_sc.converged.all()
    assert s_sc.nstep.sum() < s_abs.nstep.sum()


def test_published_semantics_stop_on_batch_mean():
    f, z_true, _ = contractive_map(4, 16)
    z0 = torch.zeros(4, 16, dtype=torch.float64)
    z, st = solve(f, z0, method="anderson", max_iter=100, tol=1e-9, semantics="published")
    n = st.extra["n_iters"]
    assert (st.nstep == n).all()               # one count for the whole batch
    assert st.extra["trace_rel"][n - 1] < 1e-9    # (the fused engine pads its device trace with NaN)
    assert torch.allclose(z, z_true, atol=1e-7)
    zf, stf = solve(f, z0, method="fpi", max_iter=300, tol=1e-9, semantics="published")
    assert torch.allclose(zf, z_true, atol=1e-7)


def test_published_anderson_evaluation_count():
    f, _, _ = contractive_map(2, 5)
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    solve(counted, torch.zeros(2, 5, dtype=torch.float64), method="anderson", max_iter=4, tol=0.0,
          semantics="published")
    assert len(calls) == 4 + 2                 # X0, X1 = f(X0), then one per mixed iterate


def test_bad_inputs():
    f, _, _ = contractive_map(1, 3)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(f, torch.zeros(1, 3), method="newton")
    with pytest.raises(ValueError, match="max_iter"):
        solve(f, torch.zeros(1, 3), max_iter=0)
    with pytest.raises(ValueError, match="NaN"):
        solve(f, torch.full((1, 3), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        solve(f, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        solve(f, torch.zeros(1, 3, dtype=torch.float64), backend="tpu")
