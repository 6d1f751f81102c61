import gc
import weakref

import pytest
import torch

from ldeq_fast.deq import BackwardLog, SolverSettings, deq_fixed_point


class ToyCell(torch.nn.Module):
    """f(z, x) = tanh(W z + U x + b), contractive in z."""

    def __init__(self, D=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64) * 0.1)
        self.saved = []

    def forward(self, z, x):
        out = torch.tanh(z @ self.W.T + x @ self.U.T + self.b)
        self.saved.append(weakref.ref(out))     # tanh's graph saves its output
        return out


def settings(**kw):
    base = dict(method="anderson", max_iter=100, tol=1e-13, stop_mode="abs", backend="torch")
    base.update(kw)
    return SolverSettings(**base)


def unrolled(cell, x, n=300):
    z = torch.zeros_like(x)
    for _ in range(n):
        z = cell(z, x)
    return z


def grads(out, params):
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                               params)


@pytest.mark.parametrize("method", ["anderson", "fpi"])
def test_ift_matches_unrolled_to_convergence(method):
    cell = ToyCell()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    params = [cell.W, cell.U, cell.b, x]
    ref = grads(unrolled(cell, x), params)
    log = BackwardLog()
    z, _ = deq_fixed_point(lambda z: cell(z, x), torch.zeros(3, 6, dtype=torch.float64), settings(method=method),
                           grad_mode="ift", log=log)
    ift = grads(z, params)
    for a, b in zip(ift, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10), (a - b).abs().max()
    assert len(log.stats) == 1 and log.stats[0].converged.all()


def test_jfb_and_phantom_match_their_definitions():
    cell = ToyCell(seed=1)
    x = torch.randn(2, 6, dtype=torch.float64)
    params = [cell.W, cell.U, cell.b]
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    with torch.no_grad():
        zs = unrolled(cell, x)
    z, _ = deq_fixed_point(lambda z: cell(z, x), z0, settings(), grad_mode="jfb")
    for a, b in zip(grads(z, params), grads(cell(zs, x), params)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    z, _ = deq_fixed_point(lambda z: cell(z, x), z0, settings(), grad_mode="phantom", phantom_steps=3,
                           phantom_damping=0.5)
    ref = zs
    for _ in range(3):
        ref = 0.5 * ref + 0.5 * cell(ref, x)
    for a, b in zip(grads(z, params), grads(ref, params)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_gradcheck_ift():
    cell = ToyCell(D=3, seed=2)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x):
        z, _ = deq_fixed_point(lambda z: cell(z, x), torch.zeros(2, 3, dtype=torch.float64), settings(),
                               grad_mode="ift")
        return z

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_no_leak_without_backward_and_repeated_backward():
    cell = ToyCell()
    x = torch.randn(2, 6, dtype=torch.float64)
    z, _ = deq_fixed_point(lambda z: cell(z, x), torch.zeros(2, 6, dtype=torch.float64), settings(), grad_mode="ift")
    tracked = [r for r in cell.saved if r() is not None and r().requires_grad]
    assert len(tracked) == 1                    # one graph of f: the single tracked step
    del z
    gc.collect()
    assert all(r() is None for r in tracked)    # dropped without backward: freed
    log = BackwardLog()
    z, _ = deq_fixed_point(lambda z: cell(z, x), torch.zeros(2, 6, dtype=torch.float64), settings(),
                           grad_mode="ift", log=log)
    loss = z.square().sum()
    g1 = torch.autograd.grad(loss, cell.W, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, cell.W)[0]
    assert torch.allclose(g1, g2) and len(log.stats) == 2


def test_inference_takes_extra_step_unless_disabled():
    cell = ToyCell()
    x = torch.randn(1, 6, dtype=torch.float64)
    calls = []

    def f(z):
        calls.append(1)
        return cell(z, x)

    with torch.no_grad():
        deq_fixed_point(f, torch.zeros(1, 6, dtype=torch.float64), settings(max_iter=3, tol=0.0))
    assert len(calls) == 4
    calls.clear()
    with torch.no_grad():
        deq_fixed_point(f, torch.zeros(1, 6, dtype=torch.float64), settings(max_iter=3, tol=0.0), extra_step=False)
    assert len(calls) == 3


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_diverged_backward_solve_is_reported(backend):
    """Fixed-point iteration on a vector-Jacobian map that blows up (df/dz = 3 I): the backward says so instead of
    handing back its best iterate silently."""
    w = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, dtype=torch.float64)
    log = BackwardLog()
    z, _ = deq_fixed_point(lambda z: w * z + x, torch.zeros_like(x),
                           settings(method="fpi", max_iter=30, backend=backend), grad_mode="ift", log=log)
    with pytest.warns(RuntimeWarning, match="implicit backward solve diverged for 2 of 2 samples"):
        z.sum().backward()
    assert log.stats[-1].diverged.all()
