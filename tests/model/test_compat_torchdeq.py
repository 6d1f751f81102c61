"""ldeq_fast's solvers registered in torchdeq: same fixed point and same IFT parameter gradients as
torchdeq's own Anderson, torchdeq's stats format, clear refusals."""
import importlib
import sys

import pytest
import torch
from torch import nn

torchdeq = pytest.importorskip("torchdeq", reason="torchdeq is not installed (pip install torchdeq)")
compat = pytest.importorskip("ldeq_fast.compat.torchdeq")
from torchdeq.solver import get_solver  # noqa: E402

D_IN, D = 5, 23  # not multiples of any block size


class TinyDEQ(nn.Module):
    """z* = tanh(W z* + U x) with ||W||_2 = 0.6: a contraction, so every solver reaches the same point."""

    def __init__(self, f_solver, b_solver, core="sliced", seed=0, f_max_iter=80, dtype=torch.float64, tol=1e-11):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = nn.Parameter((0.6 * w / torch.linalg.matrix_norm(w, 2)).to(dtype))
        self.U = nn.Parameter(torch.randn(D, D_IN, generator=g, dtype=torch.float64).to(dtype))
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64).to(dtype))
        self.deq = torchdeq.get_deq(core=core, f_solver=f_solver, b_solver=b_solver, f_max_iter=f_max_iter, b_max_iter=80,
                                    f_tol=tol, b_tol=tol, f_stop_mode="abs", b_stop_mode="abs", ift=True)

    def forward(self, x):
        inj = x @ self.U.T + self.b

        def f(z):
            return torch.tanh(z @ self.W.T + inj)

        z_out, info = self.deq(f, torch.zeros(x.shape[0], D, dtype=x.dtype, device=x.device))
        return z_out[-1], info


def run(f_solver, b_solver, x, core="sliced", **kw):
    model = TinyDEQ(f_solver, b_solver, core=core, dtype=x.dtype, **kw).to(x.device).train()
    z, info = model(x)
    (z.sin().sum() + (z ** 2).mean()).backward()
    return z.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, info


@pytest.mark.parametrize("core", ["sliced", "indexing"])
@pytest.mark.parametrize("name", ["ldeq_fast_anderson", "ldeq_fast_fixed_point_iter"])
def test_same_fixed_point_and_gradients_as_torchdeq_anderson(name, core):
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z_ref, g_ref, _ = run("anderson", "anderson", x, core)
    z, g, info = run(name, name, x, core)
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=0)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-8, rtol=1e-7, msg=k)
    assert float(info["abs_lowest"].max()) < 1e-11
    # a wrong solver is caught by this comparison: stop it after two steps
    model = TinyDEQ(name, name, core=core, f_max_iter=2).train()
    assert (model(x)[0].detach() - z_ref).abs().max() > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ldeq_fast_anderson", "ldeq_fast_fixed_point_iter"])
def test_same_fixed_point_and_gradients_on_cuda_fp32(name):
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1)).cuda()
    z_ref, g_ref, _ = run("anderson", "anderson", x, tol=1e-6)
    z, g, _ = run(name, name, x, tol=1e-6)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-4, rtol=1e-4, msg=k)


def test_registry_and_stats_format():
    assert get_solver("ldeq_fast_anderson") is compat.ldeq_fast_anderson
    assert get_solver("ldeq_fast_fixed_point_iter") is compat.ldeq_fast_fixed_point_iter
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = TinyDEQ("ldeq_fast_anderson", "ldeq_fast_anderson").eval()
    ref = TinyDEQ("anderson", "anderson").eval()
    with torch.no_grad():
        z, info = model(x)
        z_ref, info_ref = ref(x)
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=0)
    assert set(info) == set(info_ref)  # abs/rel lowest and trace, nstep, sradius
    for key in ("abs_lowest", "rel_lowest", "nstep"):
        assert info[key].shape == info_ref[key].shape == (4,), key
    assert info["abs_trace"].shape[0] == 4 and info["abs_trace"].dim() == 2 and info["rel_trace"].shape == (4, 1)
    # the trace is per iteration and ends at each sample's lowest residual
    torch.testing.assert_close(info["abs_trace"][:, -1], info["abs_lowest"], atol=0, rtol=0)
    assert (info["nstep"] >= 3).all() and (info["nstep"] <= 80).all()


def test_solver_function_direct_and_refusals():
    g = torch.Generator().manual_seed(3)
    W = 0.5 * torch.randn(2, 7, 7, generator=g) / 7 ** 0.5
    c = torch.randn(2, 7, 3, generator=g)

    def f(z):  # batch (2,), state (7, 3): not flat
        return torch.tanh(W @ z + c)

    z0 = torch.zeros(2, 7, 3)
    z_ref, _, _ = get_solver("anderson")(f, z0, max_iter=60, tol=1e-6, stop_mode="rel")
    z, traj, info = compat.ldeq_fast_anderson(f, z0, max_iter=60, tol=1e-6, stop_mode="rel", indexing=[60])
    assert z.shape == z0.shape and len(traj) == 1 and torch.equal(traj[0], z)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
    assert info["rel_trace"].shape[0] == 2 and info["abs_trace"].shape == (2, 1)
    _, traj, _ = compat.ldeq_fast_fixed_point_iter(f, z0, max_iter=5, tau=0.8, backend="torch")
    assert traj == []
    with pytest.raises(NotImplementedError, match="intermediate states"):
        compat.ldeq_fast_anderson(f, z0, max_iter=10, indexing=[4, 10])
    with pytest.raises(NotImplementedError, match="return_final"):
        compat.ldeq_fast_anderson(f, z0, max_iter=10, return_final=True)
    with pytest.raises(ValueError, match="NaN"):
        compat.ldeq_fast_anderson(f, torch.full_like(z0, float("nan")), max_iter=10)


def test_clear_import_error_without_torchdeq(monkeypatch):
    for mod in [m for m in sys.modules if m == "torchdeq" or m.startswith("torchdeq.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.delitem(sys.modules, "ldeq_fast.compat.torchdeq")
    with pytest.raises(ImportError, match="needs torchdeq.*pip install torchdeq"):
        importlib.import_module("ldeq_fast.compat.torchdeq")
