"""Fixed-iteration streaming forward: same answer as the ordinary forward, no host sync (so it can be
captured as a CUDA graph), and the graph replay itself on a GPU."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.streaming import GraphedForward

pytestmark = pytest.mark.usefixtures("one_thread")


class _HostSyncs(TorchDispatchMode):
    """Counts ops that read a tensor's value on the host (.item(), bool(), data-dependent shapes)."""
    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(s in func.__name__ for s in self.SYNCING):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _model(backend):
    torch.manual_seed(0)
    return LDEQ(LDEQConfig.small(backend=backend, max_iters=6)).eval()


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fixed_iteration_forward_matches_the_model_and_never_syncs(backend):
    model = _model(backend)
    x = torch.randn(2, 3, 128, 128)
    gf = GraphedForward(model, batch=2, iters=2)
    with torch.no_grad():
        want = model(x, max_iters=2, solver=model.solver_settings(2, tol=0.0))
    got = gf(x)
    torch.testing.assert_close(got.keypoints, want.keypoints, atol=1e-6, rtol=0)
    # RwR: warm-started from the previous z*
    with torch.no_grad():
        want2 = model(x + 0.1, z0=want.z_star, solver=model.solver_settings(2, tol=0.0))
    got2 = gf(x + 0.1, got.z_star)
    torch.testing.assert_close(got2.keypoints, want2.keypoints, atol=1e-6, rtol=0)
    assert not torch.equal(got2.keypoints, got.keypoints)  # copies, not the shared buffers
    if backend != "torch":   # the fused engine; the reference solver reads residuals on the host
        with _HostSyncs() as syncs:
            gf._run()
        assert syncs.calls == []


def test_bad_shapes_and_values_are_refused():
    gf = GraphedForward(_model("auto"), batch=1, iters=1)
    with pytest.raises(ValueError, match="shape"):
        gf(torch.randn(2, 3, 128, 128))
    bad = torch.randn(1, 3, 128, 128)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gf(bad)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedForward(_model("auto"), batch=1, use_graph=True)
    with pytest.raises(ValueError, match="backend"):
        GraphedForward(_model("torch"), batch=1, use_graph=True)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _model("auto").cuda()
    x = torch.randn(1, 3, 128, 128, device="cuda")
    eager = GraphedForward(model, batch=1, iters=1, use_graph=False)
    graphed = GraphedForward(model, batch=1, iters=1)
    a, b = eager(x), graphed(x)
    torch.testing.assert_close(b.keypoints, a.keypoints, atol=1e-5, rtol=0)
    a2, b2 = eager(x * 0.9, a.z_star), graphed(x * 0.9, b.z_star)
    torch.testing.assert_close(b2.keypoints, a2.keypoints, atol=1e-5, rtol=0)
