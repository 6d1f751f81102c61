"""Building blocks of the LDEQ architecture (module and parameter names follow the published code,
so published state_dicts load without renaming)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldeq_fast.model import winograd
from ldeq_fast.model.recompute import remember
from ldeq_fast.ops.heatmap import softargmax_heatmaps
from ldeq_fast.ops.leaky_relu_group_norm import leaky_relu_group_norm

LEAKY_SLOPE = 0.01


class ConvBlock(nn.Module):
    """conv (bias, same padding) -> LeakyReLU(0.01) -> norm.  The norm comes *after* the activation.

    ``epilogue_backend``: 'torch' runs the eager ops; any other backend runs LeakyReLU -> GroupNorm as one
    fused op (ldeq_fast/ops/leaky_relu_group_norm.py).  LDEQ sets it from its config (the model's fast-path switch).
    """

    epilogue_backend = "torch"
    # CPU inference plan (ldeq_fast/model/cpu_tuning.py), set by LDEQ per solve: the convolution's memory format
    # (None: as its weight and input come, the fixed fast-path layout) and whether a split 1x1 conv may add
    # its partner with oneDNN's post-op
    memory_format = None
    post_add = True
    conv_algorithm = "direct"   # or 'winograd' (ldeq_fast/model/winograd.py), also set by the plan

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, norm: str = "bn",
                 gn_groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=True)
        self.act = act
        if norm == "bn":
            self.norm = nn.BatchNorm2d(cout)
        elif norm == "gn":
            self.norm = nn.GroupNorm(gn_groups, cout)
        elif norm == "none":
            self.norm = None
        else:
            raise ValueError(f"unknown norm {norm!r}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.epilogue(self.conv_forward(x), residual)

    def conv_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution, in ``memory_format`` when the plan sets one (input and weight both in it)."""
        if self.memory_format is None:
            return self.conv(x)
        c = self.conv
        if self.conv_algorithm == "winograd":
            return winograd.conv5x5(x, self._cached(("winograd",), lambda: winograd.transform_weight(c.weight)), c.bias)
        return F.conv2d(x.contiguous(memory_format=self.memory_format), self.planned_weight(), c.bias, c.stride,
                        c.padding, c.dilation, c.groups)

    def _cached(self, what: tuple, make):
        """``make()`` kept per weight version: a parameter's layout is never changed behind an optimizer's
        back, and an updated parameter (a new version) is converted again.  Inside torch.compile the
        conversion is traced into the graph instead (dynamo cannot key a dict on data_ptr/_version: that
        was a graph break and a recompile per module); it is a small pass over the weight."""
        if torch.compiler.is_compiling():
            return make()
        key = (*what, self.conv.weight.data_ptr(), self.conv.weight._version)
        cache = self.__dict__.setdefault("_planned_weights", {})
        if key not in cache:
            if len(cache) >= 6:   # stale versions of the weight
                cache.clear()
            cache[key] = make()
        return cache[key]

    def planned_weight(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The weight (input channels [start, stop)) in the plan's memory format, kept between calls."""
        w = self.conv.weight
        if start is not None:
            w = w[:, start:stop]
        fmt = self.memory_format or torch.contiguous_format
        if w.is_contiguous(memory_format=fmt):
            return w
        return self._cached((start, stop, fmt), lambda: w.detach().contiguous(memory_format=fmt))

    def split_conv_add_uses_post_op(self, *tensors: torch.Tensor) -> bool:
        """The split 1x1 conv's add runs as oneDNN's post-op: the plan allows it, eager CPU fp32 inference.
        Under torch.compile the plain conv + add is traced instead and inductor fuses the add into its
        neighbours (the in-place post-op would need functionalising, and inductor cannot see into it)."""
        return self.post_add and not torch.compiler.is_compiling() and _onednn_post_add_ok(*tensors)

    def epilogue(self, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """LeakyReLU -> norm of a conv output, plus ``residual`` when given (a residual connection around
        the block: the fused op adds it in its output pass)."""
        if self.act and isinstance(self.norm, nn.GroupNorm) and self.epilogue_backend != "torch":
            res = self._fused_epilogue(out, self.norm.weight, self.norm.bias, residual)
            # training: stored as a recipe (see recompute.py)
            remember(res, self._fused_epilogue, out, self.norm.weight, self.norm.bias, residual)
            return res
        if self.act:
            out = F.leaky_relu(out, LEAKY_SLOPE)
        if self.norm is not None:
            out = self.norm(out)
        return out if residual is None else out + residual

    def _fused_epilogue(self, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        return leaky_relu_group_norm(y, weight, bias, self.norm.num_groups, self.norm.eps, LEAKY_SLOPE,
                                     residual=residual, backend=self.epilogue_backend)

    def conv_channels(self, x: torch.Tensor, start: int, stop: int, bias: bool, add: torch.Tensor | None = None,
                      add_in_place: bool = False) -> torch.Tensor:
        """The 1x1 conv restricted to input channels [start, stop) (x holds just those channels): a conv
        over a channel concatenation is the sum of such partial convs, one per part.  Plus ``add`` when
        given: in CPU fp32 inference one oneDNN convolution with the add as a post-op, written into ``add``
        itself when ``add_in_place`` (the caller owns it) — the separate add's pass over memory is saved."""
        if self.conv.kernel_size != (1, 1):
            raise ValueError("conv_channels splits 1x1 convolutions only")
        b = self.conv.bias if bias else None
        if self.memory_format is None:
            w = self.conv.weight[:, start:stop]
        else:
            w = self.planned_weight(start, stop)
            x = x.contiguous(memory_format=self.memory_format)
            if add is not None and not add_in_place:
                add = add.contiguous(memory_format=self.memory_format)
        if add is None:
            return F.conv2d(x, w, b)
        if self.split_conv_add_uses_post_op(x, w, add):
            if add.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
                    memory_format=torch.channels_last):
                # oneDNN fuses the add only with both operands in one format (else: conv, add, re-layout);
                # the cell's z arrives in the solver's NCHW order
                x = x.contiguous(memory_format=torch.channels_last)
            conv_add = torch.ops.mkldnn._convolution_pointwise_ if add_in_place else torch.ops.mkldnn._convolution_pointwise
            args = (add, x) if add_in_place else (x, add)
            return conv_add.binary(*args, w, b, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None)
        return F.conv2d(x, w, b) + add


def _onednn_post_add_ok(*tensors: torch.Tensor) -> bool:
    """oneDNN's conv + add post-op: CPU, float32, no autograd graph, no autocast (it has no autograd or
    autocast rule)."""
    return (torch.backends.mkldnn.is_available() and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


class Hourglass(nn.Module):
    """Depth-4 hourglass; widths w, w+i, w+2i, w+3i, w+4i.  Attribute names match the published model
    (including its spelling 'bottlneck')."""

    def __init__(self, w: int, i: int, norm: str = "gn", gn_groups: int = 1):
        super().__init__()
        w1, w2, w3, w4 = w + i, w + 2 * i, w + 3 * i, w + 4 * i

        def block(cin, cout, k):
            return ConvBlock(cin, cout, k, norm=norm, gn_groups=gn_groups)

        self.same1, self.upchan1 = block(w, w, 3), block(w, w1, 3)
        self.same2, self.upchan2 = block(w1, w1, 3), block(w1, w2, 3)
        self.same3, self.upchan3 = block(w2, w2, 3), block(w2, w3, 3)
        self.same4, self.upchan4 = block(w3, w3, 3), block(w3, w4, 3)
        self.bottlneck = block(w4, w4, 3)
        self.downchan1, self.downchan2, self.same5 = block(w4, w3, 3), block(2 * w3, w3, 1), block(w3, w3, 5)
        self.downchan3, self.downchan4, self.same6 = block(w3, w2, 3), block(2 * w2, w2, 1), block(w2, w2, 5)
        self.downchan5, self.downchan6, self.same7 = block(w2, w1, 3), block(2 * w1, w1, 1), block(w1, w1, 5)
        self.downchan7, self.downchan8, self.same8 = block(w1, w, 3), block(2 * w, w, 1), block(w, w, 5)

    def forward(self, x: torch.Tensor, split_concat: bool = False) -> torch.Tensor:
        skips = []
        out = x
        for same, upchan in ((self.same1, self.upchan1), (self.same2, self.upchan2),
                             (self.same3, self.upchan3), (self.same4, self.upchan4)):
            s = same(out)
            skips.append(s)
            out = upchan(F.avg_pool2d(s, 2, 2))
        out = self.bottlneck(out)
        for narrow, fuse, same in ((self.downchan1, self.downchan2, self.same5),
                                   (self.downchan3, self.downchan4, self.same6),
                                   (self.downchan5, self.downchan6, self.same7),
                                   (self.downchan7, self.downchan8, self.same8)):
            low, skip = narrow(out), skips.pop()
            if split_concat:
                fused = fuse.epilogue(split_fuse_conv(fuse, skip, low))
            else:
                up = F.interpolate(low, scale_factor=2, mode="nearest")
                fused = fuse(torch.cat((skip, up), 1))
            out = same(fused, residual=fused)
        return out

    def fuse_blocks(self) -> tuple:
        """The 1x1 blocks over cat(skip, up2(low)) (run as split convs on the fast path)."""
        return self.downchan2, self.downchan4, self.downchan6, self.downchan8


def split_fuse_conv(fuse: ConvBlock, skip: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """fuse's 1x1 conv over cat(skip, up2(low)) = conv(skip) + up2(conv(low)): nearest upsampling commutes
    with a 1x1 conv, so the second half runs at quarter resolution and no concatenation is stored for
    backward (before fuse's epilogue)."""
    c = skip.shape[1]
    up = F.interpolate(fuse.conv_channels(low, c, 2 * c, bias=False), scale_factor=2, mode="nearest")
    return fuse.conv_channels(skip, 0, c, bias=True, add=up, add_in_place=True)


def linear_normalize(h: torch.Tensor) -> torch.Tensor:
    lo, hi = h.amin(dim=(2, 3), keepdim=True), h.amax(dim=(2, 3), keepdim=True)
    return (h - lo) / (hi - lo + 1e-5)


class HeatmapNorm(nn.Module):
    """The cell's last op: maps head features to heatmaps in [0, 1]."""

    epilogue_backend = "torch"   # the softargmax op's backend (LDEQ sets it from its config, as for ConvBlock)

    def __init__(self, channels: int, mode: str = "softargmax", beta: float = 1.0, learn_beta: bool = False):
        super().__init__()
        self.mode = mode
        if mode == "softargmax" and learn_beta:
            # softplus(raw) = beta at init; one beta per channel
            raw = torch.full((channels,), float(beta)).expm1().log()
            self.beta_raw = nn.Parameter(raw)
        else:
            self.beta_raw = None
            self.beta = float(beta)

    def effective_beta(self):
        if self.beta_raw is None:
            return self.beta
        return F.softplus(self.beta_raw).view(1, -1, 1, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mode == "softargmax":
            return softargmax_heatmaps(h, self.effective_beta(), backend=self.epilogue_backend)
        if self.mode == "linear":
            return linear_normalize(h)
        return h


class Cell(nn.Module):
    """f(z, x) = heatmap_norm(head(hourglass(tail(cat[z, x]))))."""

    def __init__(self, cfg, norm: str = "gn"):
        super().__init__()
        self.tail = ConvBlock(cfg.z_width + cfg.injection_width, cfg.cell_base_width, 1, norm=norm,
                              gn_groups=cfg.cell_gn_groups)
        self.hourglass = Hourglass(cfg.cell_base_width, cfg.cell_width_increment, norm=norm,
                                   gn_groups=cfg.cell_gn_groups)
        self.head = ConvBlock(cfg.cell_base_width, cfg.z_width, 1, norm="none", act=False)
        self.features_to_heatmaps = HeatmapNorm(cfg.z_width, cfg.cell_norm, cfg.softargmax_beta,
                                                cfg.learn_softargmax_beta)

    def split_tail_conv(self, z: torch.Tensor, injection_term: torch.Tensor) -> torch.Tensor:
        """The tail's 1x1 conv over cat(z, injection) as z's share plus the precomputed injection term."""
        return self.tail.conv_channels(z, 0, z.shape[1], bias=False, add=injection_term)

    def split_blocks(self) -> tuple:
        """The blocks whose 1x1 conv runs split over a concatenation on the fast path: the tail, the fuses."""
        return (self.tail, *self.hourglass.fuse_blocks())

    def injection_term(self, injection: torch.Tensor) -> torch.Tensor:
        """The injection's share of the tail's 1x1 conv over cat(z, injection), bias included: it is the
        same at every solver iteration, so the fast path computes it once per solve."""
        cin = self.tail.conv.in_channels
        return self.tail.conv_channels(injection, cin - injection.shape[1], cin, bias=True)

    def forward(self, z: torch.Tensor, injection: torch.Tensor,
                injection_term: torch.Tensor | None = None) -> torch.Tensor:
        """f(z, x).  With ``injection_term`` (= ``self.injection_term(injection)``) the 1x1 convs over
        concatenations run as sums of partial convs: the same values, less work and less saved memory."""
        if injection_term is None:
            out = self.tail(torch.cat((z, injection), 1))
        else:
            out = self.tail.epilogue(self.split_tail_conv(z, injection_term))
        out = self.hourglass(out, split_concat=injection_term is not None)
        return self.features_to_heatmaps(self.head(out))


class Stem(nn.Sequential):
    """Conv7x7/2 -> Conv3x3 -> MaxPool2 -> Conv3x3, BatchNorm; published name 'tail'."""

    def __init__(self, width: int):
        super().__init__(ConvBlock(3, width // 4, 7, 2), ConvBlock(width // 4, width // 2, 3, 1),
                         nn.MaxPool2d(2, 2), ConvBlock(width // 2, width, 3, 1))
