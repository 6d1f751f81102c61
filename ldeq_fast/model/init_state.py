"""A learned initial state z0 = h(x) for the DEQ solve (in the spirit of Bai et al., "Neural Deep Equilibrium
Solvers", ICLR 2022): a few cell evaluations from h(x) land where many from zeros do.

``h`` reads the stem's injection x (computed anyway) and predicts the state's logits with a small hourglass
at half the heatmap resolution; the logits pass through the cell's own output map (its softargmax norm), so
z0 lies on the manifold of states the cell produces.  It is fitted without labels, from the model's own
fixed points (``ldeq_fast.fit_init``), so it can be fitted for any checkpoint on any face crops.

The init lives in its own file beside the model's (``<model stem>.init.pt``), never in the model's
state_dict, so published checkpoints keep loading strictly.  The file records a fingerprint of the model it
was fitted for; loading it onto another model is an error (a stale init would quietly cost accuracy).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldeq_fast.model.checkpoint import CheckpointError, atomic_torch_save
from ldeq_fast.model.layers import ConvBlock

FORMAT = "ldeq_fast.initial_state/1"
LEAKY_SLOPE = 0.01
LOG_GAIN0 = 2.0      # initial logit gain e^2 ~ 7.4
CONFIDENCE0 = -4.0   # initial confidence logit: sigmoid(-4) ~ 0.018, a start next to zeros
LOG_SIGMA0 = 0.0     # initial peak width: 1 heatmap pixel, about the cell's own (its maps sum to ~7 px)
# a model file's suffixes that the init file's name replaces ("final.pth.tar" -> "final.init.pt")
_MODEL_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")


@dataclass
class InitConfig:
    width: int = 16      # channels of the hourglass
    levels: int = 2      # poolings below half the heatmap resolution

    def validate(self, heatmap_size: int | None = None) -> None:
        if int(self.width) < 1 or int(self.levels) < 0:
            raise ValueError(f"InitConfig: width must be >= 1 and levels >= 0, got {self.width}, {self.levels}")
        if heatmap_size is not None and heatmap_size % 2 ** (self.levels + 1):
            raise ValueError(f"InitConfig: heatmap_size {heatmap_size} must be divisible by 2^(levels + 1) = "
                             f"{2 ** (self.levels + 1)}")

    @classmethod
    def for_model(cls, cfg) -> "InitConfig":
        """The default size for a model: 16 channels for narrow injections, 32 at the published width; two
        levels below half the heatmap size (a 4x4 or 8x8 bottleneck: its 3x3 conv sees most of the face)."""
        levels = max(0, min(2, (cfg.heatmap_size // 4).bit_length() - 1))
        return cls(width=16 if cfg.injection_width <= 64 else 32, levels=levels)


class InitialState(nn.Module):
    """h: injection (B, C_inj, H, W) -> z0 (B, z_width, H, W): per channel a Gaussian peak of height
    ``confidence`` at a predicted position, the shape of the cell's own heatmaps (its softargmax norm peaks
    at 1 around the landmark).

    The positions are a soft-argmax of predicted logits: a strided conv block to H/2, ``levels`` more strided
    blocks, back up with nearest upsampling plus the skip and a conv block, a 1x1 conv to the state's
    channels, a spatial softmax, its mean.  The widths are learned per channel; the confidence, per
    sample and channel in (0, 1), comes from the pooled bottleneck.  It starts near 0, so a fresh h starts
    where the published solve does (z0 = 0, the start the cell was trained from), and fitting raises it where
    the maps earn the cell's trust: a confident wrong map misleads the cell more than zeros do.  Rendering the
    peaks separably (a row profile times a column profile) keeps h's full-resolution work to one write of
    the state: no full-resolution convolution, upsampling or softmax."""

    def __init__(self, in_channels: int, out_channels: int, heatmap_size: int, config: InitConfig | None = None):
        super().__init__()
        self.config = config or InitConfig()
        self.config.validate(heatmap_size)
        self.in_channels, self.out_channels, self.heatmap_size = int(in_channels), int(out_channels), heatmap_size
        w, n = self.config.width, self.config.levels

        def block(cin, cout, stride=1):   # conv -> LeakyReLU -> GroupNorm, the cell's block (fused epilogue)
            return ConvBlock(cin, cout, 3, stride, norm="gn", gn_groups=1)
        self.inp = block(in_channels, w, 2)      # strided convs halve the resolution (no separate pooling)
        self.down = nn.ModuleList(block(w, w, 2) for _ in range(n))
        self.up = nn.ModuleList(block(w, w) for _ in range(n))
        self.out = nn.Conv2d(w, out_channels, 1)
        # a learned gain on the logits: a sharp soft-argmax needs logit ranges that unit-scale features times
        # small weights would take many steps to reach
        self.log_gain = nn.Parameter(torch.tensor(float(LOG_GAIN0)))
        self.log_sigma = nn.Parameter(torch.full((out_channels,), float(LOG_SIGMA0)))  # peak widths, heatmap px
        self.confidence = nn.Linear(w, out_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out.weight)   # starts at the centre; fitting moves the peaks
        nn.init.zeros_(self.confidence.weight)
        nn.init.constant_(self.confidence.bias, CONFIDENCE0)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(peak positions (B, z_width, 2) as (x, y) in heatmap pixels, confidence (B, z_width))."""
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.in_channels
                                           or x.shape[-1] != self.heatmap_size or x.shape[-2] != self.heatmap_size):
            raise ValueError(f"the initial state expects injections (B, {self.in_channels}, {self.heatmap_size}, "
                             f"{self.heatmap_size}), got {tuple(x.shape)}")
        y = self.inp(x)
        skips = []
        for block in self.down:
            skips.append(y)
            y = block(y)
        confidence = torch.sigmoid(self.confidence(y.mean(dim=(2, 3))))
        for block in self.up:
            y = block(F.interpolate(y, scale_factor=2, mode="nearest") + skips.pop())
        logits = self.out(y)
        b, c, h, w = logits.shape
        p = torch.softmax(logits.reshape(b, c, h * w).float() * self.log_gain.exp(), dim=-1)
        return p @ self._coords(h, w, x.device), confidence.float()

    def _coords(self, h: int, w: int, device) -> torch.Tensor:
        """(h*w, 2) full-resolution (x, y) of the half-resolution pixels' centres (pixel k covers 2k, 2k+1)."""
        key = (h, w, str(device))
        cache = self.__dict__.setdefault("_coord_cache", {})
        if key not in cache:
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            cache[key] = torch.stack((xs, ys), dim=-1).reshape(h * w, 2).float() * 2 + 0.5
        return cache[key]

    def render(self, centres: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """The state: Gaussian peaks of height ``confidence`` at ``centres`` (B, C, 2), separably."""
        grid = torch.arange(self.heatmap_size, device=centres.device, dtype=centres.dtype)
        d2 = (grid - centres[..., None]).square() * (-0.5 * torch.exp(-2 * self.log_sigma.float()))[:, None, None]
        g = d2.exp_()                                              # (B, C, 2, H): x and y profiles
        return (g[:, :, 1] * confidence[..., None])[..., :, None] * g[:, :, 0, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z0 (B, z_width, H, W) for injections x (float32)."""
        return self.render(*self.parts(x))

    def describe(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "heatmap_size": self.heatmap_size, **asdict(self.config)}


def new_initial_state(model, config: InitConfig | None = None) -> InitialState:
    c = model.cfg
    return InitialState(c.injection_width, c.z_width, c.heatmap_size, config or InitConfig.for_model(c))


# ---------------------------------------------------------------------------------------------- cost
def _conv_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def init_cost_flops(model, h: InitialState | None = None) -> dict:
    """FLOPs (convolutions and matmuls, per image) of the initial state and of one cell evaluation: the
    init's cost in cell evaluations is ``ratio``."""
    h = h if h is not None else model.initial_state
    if h is None:
        raise ValueError("the model has no initial state attached")
    c = model.cfg
    p = next(model.parameters())
    x = torch.zeros(1, c.injection_width, c.heatmap_size, c.heatmap_size, device=p.device, dtype=p.dtype)
    z = torch.zeros(model.z_shape(1), device=p.device, dtype=model.state_dtype)
    init = _conv_flops(lambda: h(x))
    with torch.enable_grad():   # every conv as an aten conv the counter sees (oneDNN's fused conv+add it does not)
        f = model.cell_fn(x)    # as the solver runs it: the injection's share of the first conv is computed once
        cell = _conv_flops(lambda: f(z))
    return {"init_flops": init, "cell_flops": cell, "ratio": init / cell}


# ---------------------------------------------------------------------------------------------- files
def init_path_for(model_path) -> Path:
    """Where a model's initial state is kept: ``<model stem>.init.pt`` beside the model file."""
    p = Path(model_path)
    name = p.name
    while True:
        low = name.lower()
        cut = next((s for s in _MODEL_SUFFIXES if low.endswith(s) and len(name) > len(s)), None)
        if cut is None:
            break
        name = name[: -len(cut)]
    return p.with_name(name + ".init.pt")


def model_fingerprint(model) -> str:
    """A hash of the model's parameters and buffers (the stem and the cell: what the init was fitted to)."""
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        t = v.detach().to("cpu", torch.float64 if v.is_floating_point() else v.dtype).contiguous()
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:20]


class InitFileError(CheckpointError):
    """An initial-state file that cannot be used: missing, corrupt, or fitted for another model."""


def save_initial_state(h: InitialState, path, model, meta: dict | None = None) -> Path:
    """Write ``h`` (fitted for ``model``) to ``path`` atomically; ``meta``: what the fit measured."""
    obj = {"format": FORMAT, "architecture": h.describe(), "model_fingerprint": model_fingerprint(model),
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in h.state_dict().items()},
           "meta": dict(meta or {})}
    path = Path(path)
    atomic_torch_save(obj, path)
    return path


def read_initial_state(path, model=None, check_fingerprint: bool = True) -> tuple[InitialState, dict]:
    """Load an initial-state file (weights-only).  With ``model``: checked to fit it (shapes, and the
    fingerprint of the weights it was fitted for unless ``check_fingerprint=False``).  Returns (h, file meta)."""
    path = Path(path)
    if not path.is_file():
        raise InitFileError(f"initial-state file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise InitFileError(f"{path}: corrupt or unsafe initial-state file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise InitFileError(f"{path}: not an ldeq_fast initial-state file (format {got!r}, expected {FORMAT!r})")
    try:
        arch = dict(obj["architecture"])
        cfg = InitConfig(width=int(arch["width"]), levels=int(arch["levels"]))
        h = InitialState(arch["in_channels"], arch["out_channels"], arch["heatmap_size"], cfg)
        h.load_state_dict(obj["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InitFileError(f"{path}: malformed initial-state file ({type(exc).__name__}: {exc})") from exc
    for k, v in h.state_dict().items():
        if not bool(torch.isfinite(v).all()):
            raise InitFileError(f"{path}: parameter {k} contains NaN or inf")
    if model is not None:
        c = model.cfg
        want = (c.injection_width, c.z_width, c.heatmap_size)
        if (h.in_channels, h.out_channels, h.heatmap_size) != want:
            raise InitFileError(f"{path}: initial state for injection/state/heatmap sizes "
                                f"{(h.in_channels, h.out_channels, h.heatmap_size)}, the model has {want}")
        if check_fingerprint and obj.get("model_fingerprint") != model_fingerprint(model):
            raise InitFileError(f"{path}: fitted for other weights than this model's (fingerprint "
                                f"{obj.get('model_fingerprint')} vs {model_fingerprint(model)}); fit one for it with "
                                "`ldeq-fast fit-init --model M --synthetic N --out <model stem>.init.pt`")
    return h.eval(), dict(obj.get("meta", {}))


def attach_initial_state(model, model_path, init="auto"):
    """What the model loaders do with the init: ``init='auto'`` attaches ``<model stem>.init.pt`` when it
    exists beside ``model_path``; a path attaches that file (it must exist); None or False attaches none.
    Returns the model."""
    if init is None or init is False:
        return model
    if isinstance(init, str) and init == "auto":
        path = init_path_for(model_path)
        if not path.is_file():
            return model
    else:
        path = Path(init)
    h, meta = read_initial_state(path, model)
    model.set_initial_state(h)
    model.initial_state_info = {"path": str(path), **meta}
    return model
