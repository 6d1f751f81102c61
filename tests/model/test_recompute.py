"""The fast path's training-memory measures: split 1x1 convs, recomputed stem and norm epilogues."""
import copy

import pytest
import torch
from conftest import needs_cpp

from ldeq_fast import LDEQ, LDEQConfig
from ldeq_fast.model.layers import Cell
from ldeq_fast.model.recompute import EpilogueRecompute

pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_concat_cell_equals_concat_cell():
    torch.manual_seed(0)
    cfg = LDEQConfig.small()
    cell = Cell(cfg).double()
    for m in cell.modules():        # non-trivial norm affines and biases
        for p in m.parameters(recurse=False):
            torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(2, cfg.z_width, 32, 32, dtype=torch.float64)
    x = torch.randn(2, cfg.injection_width, 32, 32, dtype=torch.float64)
    want = cell(z, x)
    got = cell(z, x, cell.injection_term(x))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_place", [False, True])
def test_conv_with_post_add_equals_conv_plus_add(in_place):
    """In CPU inference the add rides on the oneDNN convolution; the value is the conv plus the add."""
    from ldeq_fast.model.layers import ConvBlock, _onednn_post_add_ok

    torch.manual_seed(0)
    block = ConvBlock(48, 16, 1, norm="gn").eval()
    x = torch.randn(2, 24, 8, 8)
    add = torch.randn(2, 16, 8, 8)
    want = torch.nn.functional.conv2d(x, block.conv.weight[:, 24:], block.conv.bias) + add
    keep = add.clone()
    with torch.no_grad():
        assert _onednn_post_add_ok(x, add) == torch.backends.mkldnn.is_available()
        got = block.conv_channels(x, 24, 48, bias=True, add=add, add_in_place=in_place)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if not in_place:
        assert torch.equal(add, keep)      # the injection term is reused every iteration: left alone
    with torch.enable_grad():              # with a graph: the plain ops (oneDNN's post-op has no autograd)
        assert not _onednn_post_add_ok(x, add)


def _train_step(model, x, target):
    out = model(x)
    (out.keypoints - target).abs().mean().backward()
    return out


@needs_cpp
@pytest.mark.parametrize("grad_mode", ["ift", "phantom", "jfb"])
def test_recompute_gives_the_same_gradients_and_bn_statistics(grad_mode):
    torch.manual_seed(0)
    cfg = LDEQConfig.small(max_iters=4, grad_mode=grad_mode, train_recompute=False)
    plain = LDEQ(cfg).train()
    lean = copy.deepcopy(plain)
    lean.cfg = cfg.replace(train_recompute=True)
    x, target = torch.randn(2, 3, 128, 128), torch.rand(2, 98, 2)
    a, b = _train_step(plain, x, target), _train_step(lean, x, target)
    assert torch.equal(a.keypoints, b.keypoints)
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)
    # the stem's BatchNorm counted the batch once, not again in the recompute
    for (name, s), t in zip(plain.named_buffers(), lean.buffers()):
        assert torch.equal(s, t), name
    assert int(lean.tail[0].norm.num_batches_tracked) == 1


class _CountingRecompute(EpilogueRecompute):
    def __init__(self):
        super().__init__()
        self.recipes = 0
        self.chained = 0  # recipes with a recipe among their inputs: the residual connections

    def _pack(self, t):
        packed = super()._pack(t)
        if packed is not t:
            self.recipes += 1
            self.chained += any(isinstance(i, type(packed)) for i in packed.inputs)
        return packed


@needs_cpp
def test_epilogue_outputs_are_saved_as_recipes():
    torch.manual_seed(0)
    cfg = LDEQConfig.small()
    cell = Cell(cfg)
    for m in cell.modules():
        if hasattr(m, "epilogue_backend"):
            m.epilogue_backend = "auto"
    x = torch.randn(1, cfg.injection_width, 32, 32)
    z = torch.randn(1, cfg.z_width, 32, 32, requires_grad=True)
    with _CountingRecompute() as ctx:
        out = cell(z, x, cell.injection_term(x))
    # every LeakyReLU -> GroupNorm block output that a consumer saves (a conv, a pooling; the 4 skips are
    # saved twice) is packed as a recipe; the 4 blocks that add a residual connection
    # recompute the residual from its own recipe
    n_blocks = sum(isinstance(m, torch.nn.GroupNorm) for m in cell.modules())
    assert n_blocks == 22 and ctx.recipes == n_blocks + 4 and ctx.chained == 4
    (g,) = torch.autograd.grad(out.sum(), z)
    z2 = z.detach().requires_grad_()
    (g_stored,) = torch.autograd.grad(cell(z2, x, cell.injection_term(x)).sum(), z2)
    assert torch.equal(g, g_stored)


@needs_cpp
def test_recompute_refuses_double_backward_and_in_place_changes():
    torch.manual_seed(0)
    cfg = LDEQConfig.small(max_iters=2, grad_mode="jfb")
    model = LDEQ(cfg).train()
    x = torch.randn(1, 3, 128, 128)
    out = model(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.keypoints.sum(), list(model.deq_layer.cell.parameters()), create_graph=True)
    out = model(x)
    with torch.no_grad():
        model.deq_layer.cell.tail.norm.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified"):
        out.keypoints.sum().backward()
