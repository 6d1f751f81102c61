"""Training LDEQ: ``ldeq-fast train`` and ``ldeq_fast.train`` as a library.

Forward solve without a graph, one tracked cell step, implicit (or phantom / JFB) backward; AdamW with
linear warm-up + cosine decay; gradient clipping; optional EMA of the weights; bf16 autocast on GPU;
stochastic solver depth as an option; evaluation per split with NME / FR / AUC.

Checkpoints (``{out_dir}/last.pt``) are written atomically and hold everything needed to resume exactly:
model, optimizer, scheduler, EMA, step, skip counters, and the Python / torch RNG states.  The data order is
a pure function of (seed, epoch) and augmentation of (seed, epoch, index), so resuming at step s replays the
same batches as an uninterrupted run; a resume whose settings would change that run (seed, batch, steps,
schedule, loss, data, model: ``RESUME_FREE_KEYS`` lists the ones that may change) is refused, naming the
keys.

Bad numbers are never applied: a step whose loss or gradients are not finite, or whose forward or backward
(IFT) solve diverged for any sample (NaN/inf or a residual blow-up: the solver then returns a frozen earlier
iterate, not a fixed point, and the gradient built on it is no gradient of the model) is skipped (no
optimizer step, no EMA update, the model's buffers restored), counted (``skipped_steps`` in every train row, and a
``kind: "skip"`` row for each), and training stops with ``FloatingPointError`` after more than
``max_consecutive_skips`` skipped steps in a row.  A skipped step still consumes its batch and advances the
step counter and the lr schedule (as with ``torch.amp.GradScaler``'s skipped steps): ``steps`` counts
batches, so the data order, the schedule and resuming do not depend on where skips happened.  The backward
always runs, even for a non-finite loss, so under DDP every rank takes the same decision from the same
all-reduced gradients.  Train rows carry the forward and backward (IFT) solves' converged / diverged
fractions.  Data parallel: launch with ``torchrun --nproc_per_node N``; each rank
takes its slice of every global batch (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
import warnings
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldeq_fast import metrics
from ldeq_fast.config import LDEQConfig, check_field_types
from ldeq_fast.model.checkpoint import TRAIN_CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save
from ldeq_fast.model.ldeq import LDEQ
from ldeq_fast.model.weights import save_weights

DATASETS = ("synthetic", "wflw_cropped", "wflw_original")


@dataclass
class TrainConfig:
    out_dir: str = "runs/ldeq"
    data: str = "synthetic"
    data_root: str | None = None
    train_split: str = "train"
    eval_splits: list = field(default_factory=lambda: ["test"])
    synthetic_train_size: int = 20000
    synthetic_eval_size: int = 256
    synthetic_difficulty: str = "normal"
    cache_in_memory: bool = False          # render/decode every training item once, keep it in RAM
    augment: bool = True
    model_preset: str = "default"          # default | small
    model: dict = field(default_factory=dict)   # LDEQConfig overrides
    steps: int = 1000
    batch_size: int = 16                   # global batch (split across ranks)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0                 # 0: off
    amp: str = "auto"                      # auto (bf16 on CUDA) | bf16 | off
    loss: str = "l1"                       # l1 | l2 on keypoints in [0, 1]
    heatmap_loss_weight: float = 0.0       # optional MSE to Gaussian target heatmaps
    heatmap_sigma: float = 1.5             # heatmap pixels
    eval_every: int = 500
    ckpt_every: int = 100
    log_every: int = 10
    eval_batch_size: int = 32
    num_workers: int = 0
    seed: int = 0
    resume: bool = True
    progress: bool = True
    save_rank_weights: bool = False        # debugging/tests: every rank saves its final weights
    max_consecutive_skips: int = 10        # more non-finite steps in a row than this stop training

    def __post_init__(self):
        check_field_types(self)
        if self.data not in DATASETS:
            raise ValueError(f"TrainConfig: data must be one of {DATASETS}, not {self.data!r}")
        if self.data != "synthetic" and not self.data_root:
            raise ValueError(f"TrainConfig: data={self.data!r} needs data_root")
        if self.model_preset not in ("default", "small"):
            raise ValueError("TrainConfig: model_preset must be 'default' or 'small'")
        if self.loss not in ("l1", "l2"):
            raise ValueError("TrainConfig: loss must be 'l1' or 'l2'")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError("TrainConfig: amp must be auto|bf16|off")
        for name in ("steps", "batch_size", "eval_every", "ckpt_every", "log_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("TrainConfig: ema_decay must be in [0, 1)")
        if self.max_consecutive_skips < 0:
            raise ValueError("TrainConfig: max_consecutive_skips must be >= 0")
        self.model_config()  # validates the model overrides (unknown keys are errors)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self) -> LDEQConfig:
        base = LDEQConfig.small() if self.model_preset == "small" else LDEQConfig()
        return base.replace(**self.model)


# settings a resume may change: where things are written and read, how often the run reports, and I/O;
# every other TrainConfig key shapes the run (its batches, schedule, loss, model) and must match
RESUME_FREE_KEYS = frozenset({"out_dir", "data_root", "eval_splits", "synthetic_eval_size", "cache_in_memory",
                              "eval_every", "ckpt_every", "log_every", "eval_batch_size", "num_workers",
                              "resume", "progress", "save_rank_weights", "max_consecutive_skips"})


def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """``key: checkpoint X, now Y`` for each key whose value differs (a key the saved dict lacks counts
    as its default)."""
    defaults = defaults or {}
    out = []
    for k in sorted(current):
        old = saved.get(k, defaults.get(k))
        if old != current[k]:
            out.append(f"{k}: checkpoint {old!r}, now {current[k]!r}")
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` strings -> dict; values parsed as JSON when possible (numbers, booleans, lists),
    ``model.key=value`` sets a model override."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        if key.startswith("model."):
            out.setdefault("model", {})[key[len("model."):]] = val
        else:
            out[key] = val
    return out


# ---------------------------------------------------------------------------------------------- data
def build_dataset(cfg: TrainConfig, split: str, train: bool, image_size: int):
    if cfg.data == "synthetic":
        from ldeq_fast.data.synthetic import SyntheticFaces

        n = cfg.synthetic_train_size if train else cfg.synthetic_eval_size
        seed = cfg.seed if train else 10_000 + cfg.seed + zlib.crc32(split.encode()) % 1000
        return SyntheticFaces(n, size=image_size, seed=seed, difficulty=cfg.synthetic_difficulty)
    from ldeq_fast.data.augment import AugmentConfig

    aug = AugmentConfig() if (train and cfg.augment) else None
    if cfg.data == "wflw_cropped":
        from ldeq_fast.data.wflw import WFLWCropped

        return WFLWCropped(cfg.data_root, split, augment=aug, seed=cfg.seed, image_size=image_size)
    from ldeq_fast.data.wflw import WFLWOriginal

    return WFLWOriginal(cfg.data_root, split, size=image_size, augment=aug, seed=cfg.seed)


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Global batches of one epoch: a permutation fixed by (seed, epoch); the ragged tail is dropped."""
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


class CachedDataset(torch.utils.data.Dataset):
    """Every item of a dataset materialised once (for generated data whose rendering costs more than a
    training step's share of it).  Not for augmented datasets: the augmentation would be frozen."""

    def __init__(self, base, progress: bool = False):
        it = range(len(base))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="caching data", unit="item", leave=False)
        items = [base[i] for i in it]
        self.images = torch.stack([x["image"] for x in items])
        self.kpts = torch.stack([x["kpts"] for x in items])

    def __len__(self):
        return len(self.kpts)

    def __getitem__(self, i):
        return {"image": self.images[i], "kpts": self.kpts[i]}


def _collate(items):
    return {"image": torch.stack([it["image"] for it in items]), "kpts": torch.stack([it["kpts"] for it in items])}


# ---------------------------------------------------------------------------------------------- pieces
def warmup_cosine(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class EMA:
    """Exponential moving average of parameters and buffers (fp32 shadow)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, sd):
        self.shadow = {k: v.clone() for k, v in sd.items()}

    def copy_to(self, model):
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None   # JSON has no NaN


def solve_values(stats, device=None) -> torch.Tensor:
    """(mean iterations, converged fraction, diverged fraction) of a solve's SolverStats, on ``device``; NaN
    when there was no solve (explicit mode; no IFT backward with phantom / JFB gradients)."""
    if stats is None:
        return torch.full((3,), math.nan, device=device)
    return torch.stack((stats.nstep.float().mean(), stats.converged.float().mean(),
                        stats.diverged.float().mean())).to(device)


def _solve_row(values: list, prefix: str) -> dict:
    keys = (f"{prefix}_iters", f"{prefix}_converged", f"{prefix}_diverged")
    return {k: _finite_or_none(v) for k, v in zip(keys, values)}


def solve_summary(stats, prefix: str) -> dict:
    """``{prefix}_iters``, ``{prefix}_converged``, ``{prefix}_diverged`` of a solve (all None without one)."""
    return _solve_row(solve_values(stats).tolist(), prefix)


def gaussian_heatmaps(kpts: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Target heatmaps peaking at 1 at each keypoint (kpts in [0,1] as x/size, y/size)."""
    grid = torch.arange(size, device=kpts.device, dtype=torch.float32)
    px, py = kpts[..., 0] * size, kpts[..., 1] * size
    gx = torch.exp(-((grid.view(1, 1, -1) - px.unsqueeze(-1)) ** 2) / (2 * sigma ** 2))
    gy = torch.exp(-((grid.view(1, 1, -1) - py.unsqueeze(-1)) ** 2) / (2 * sigma ** 2))
    return gy.unsqueeze(-1) * gx.unsqueeze(-2)


def landmark_loss(out, kpts: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    diff = out.keypoints.float() - kpts
    loss = diff.abs().mean() if cfg.loss == "l1" else diff.square().mean()
    if cfg.heatmap_loss_weight > 0:
        target = gaussian_heatmaps(kpts, out.heatmaps.shape[-1], cfg.heatmap_sigma)
        loss = loss + cfg.heatmap_loss_weight * F.mse_loss(out.heatmaps.float(), target)
    return loss


@torch.no_grad()
def evaluate(model: LDEQ, dataset, batch_size: int = 32, device="cpu") -> dict:
    """NME / FR@0.1 / AUC@0.1 (inter-ocular) and mean solver iterations on a dataset."""
    was_training = model.training
    model.eval()
    preds, gts, iters = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    for b in loader:
        out = model(b["image"].to(device))
        preds.append(out.keypoints.float().cpu())
        gts.append(b["kpts"])
        iters.append(out.stats.nstep.float().cpu() if out.stats is not None else torch.zeros(len(b["kpts"])))
    model.train(was_training)
    nme, fr, auc = metrics.nme_fr_auc(torch.cat(preds), torch.cat(gts))
    return {"nme": nme, "fr": fr, "auc": auc, "iters": float(torch.cat(iters).mean()), "n": len(dataset)}


def plot_curves(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train" and r["loss"] is not None]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    for split in sorted({r["split"] for r in evals}):
        rs = [r for r in evals if r["split"] == split]
        axes[1].plot([r["step"] for r in rs], [100 * r["nme"] for r in rs], marker="o", label=split)
    axes[1].set(xlabel="step", ylabel="NME (%)", title="evaluation")
    if evals:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, device: str | None = None):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if device is None:
            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                device = f"cuda:{local}"
            else:
                device = "cpu"
        self.device = torch.device(device)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} ranks")
        self.out = Path(cfg.out_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        mcfg = cfg.model_config()
        self.model = LDEQ(mcfg).to(self.device).train()
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_cosine(s, cfg))
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.skipped_steps = 0        # steps not applied (non-finite loss or gradients), in all
        self.skipped_in_a_row = 0     # ... and in the current run of them
        self.train_set = build_dataset(cfg, cfg.train_split, True, mcfg.im_size)
        if cfg.cache_in_memory:
            if getattr(self.train_set, "augment_config", None) is not None:
                raise ValueError("cache_in_memory would freeze the augmentation: set augment=false or no cache")
            self.train_set = CachedDataset(self.train_set, progress=cfg.progress and self.rank == 0)
        self.eval_sets = {s: build_dataset(cfg, s, False, mcfg.im_size) for s in cfg.eval_splits}
        if len(self.train_set) < cfg.batch_size:
            raise ValueError(f"training set has {len(self.train_set)} items, fewer than one batch ({cfg.batch_size})")
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.ckpt_path = self.out / "last.pt"
        self.log_path = self.out / "metrics.jsonl"
        if cfg.resume and self.ckpt_path.is_file():
            self.load_checkpoint(self.ckpt_path)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        return {
            "format": TRAIN_CHECKPOINT_FORMAT, "step": self.step, "config": self.cfg.to_dict(),
            "skipped_steps": self.skipped_steps, "skipped_in_a_row": self.skipped_in_a_row,
            "model_config": self.model.cfg.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save_checkpoint(self) -> None:
        self._average_buffers()
        if self.rank == 0:
            atomic_torch_save(self.checkpoint_state(), self.ckpt_path)

    def load_checkpoint(self, path: Path) -> None:
        try:
            st = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot resume from a corrupt checkpoint ({exc})") from exc
        if not isinstance(st, dict) or st.get("format") != TRAIN_CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not an ldeq_fast training checkpoint")
        model_diff = config_differences(st["model_config"], self.model.cfg.to_dict())
        if model_diff:
            raise CheckpointError(f"{path}: cannot resume: the checkpoint was written for a different model "
                                  f"configuration ({'; '.join(model_diff)}); use another out_dir or resume=false")
        current = {k: v for k, v in self.cfg.to_dict().items() if k not in RESUME_FREE_KEYS}
        defaults = TrainConfig.__dataclass_fields__
        run_diff = config_differences(st["config"], current, {k: f.default for k, f in defaults.items()})
        if run_diff:
            raise CheckpointError(f"{path}: cannot resume: these settings differ from the checkpoint's, so the "
                                  f"resumed run would not continue the same run: {'; '.join(run_diff)}. Use the "
                                  f"checkpoint's values, another out_dir, or resume=false to start over")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        if self.ema is not None and st["ema"] is not None:
            self.ema.load_state_dict(st["ema"])
        self.step = int(st["step"])
        self.skipped_steps = int(st.get("skipped_steps", 0))
        self.skipped_in_a_row = int(st.get("skipped_in_a_row", 0))
        random.setstate(st["rng"]["python"])
        torch.set_rng_state(st["rng"]["torch"].cpu())
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in st["rng"]["cuda"]])

    # ----------------------------------------------------------------- loop
    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def _loader(self, epoch: int, start: int):
        per_rank = self.cfg.batch_size // self.world
        batches = epoch_batches(len(self.train_set), self.cfg.batch_size, self.cfg.seed, epoch)[start:]
        mine = [b[self.rank * per_rank:(self.rank + 1) * per_rank].tolist() for b in batches]
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        return DataLoader(self.train_set, batch_sampler=mine, num_workers=self.cfg.num_workers, collate_fn=_collate)

    def train_step(self, batch) -> dict:
        """One step; returns its train row.  A step with a non-finite loss or gradients, or a diverged forward
        or backward solve, applies nothing and its row says ``skipped: True`` (see the module docstring)."""
        images, kpts = batch["image"].to(self.device), batch["kpts"].to(self.device)
        self.opt.zero_grad(set_to_none=True)
        buffers = [b.clone() for b in self.model.buffers()]   # BatchNorm statistics, restored on a skip
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.net(images)
        loss = landmark_loss(out, kpts, self.cfg)
        self.model.backward_log.clear()
        loss.backward()   # even for a non-finite loss: DDP ranks all-reduce the gradients, then decide alike
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        bwd = self.model.backward_log.stats
        solves = torch.stack((solve_values(out.stats, loss.device), solve_values(bwd[-1] if bwd else None, loss.device)))
        diverged = solves[:, 2].nan_to_num(0.0) > 0
        if self.world > 1:   # each rank solved its own samples: any rank's divergence skips the step everywhere
            diverged = diverged.float()
            dist.all_reduce(diverged, op=dist.ReduceOp.MAX)
        values = torch.cat((torch.stack((loss.detach().float(), gnorm.float())), diverged.float(), solves.flatten()))
        loss_v, gnorm_v, fwd_div, bwd_div, *solve_v = values.tolist()
        reason = ("non-finite loss" if not math.isfinite(loss_v) else
                  "non-finite gradients" if not math.isfinite(gnorm_v) else
                  "forward solve diverged" if fwd_div else "backward solve diverged" if bwd_div else None)
        if reason is not None:
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        else:
            self.opt.step()
            if self.ema is not None:
                self.ema.update(self.model)
        with warnings.catch_warnings():   # a skipped first step: torch warns that the optimizer has not stepped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.sched.step()   # the schedule follows the step counter, skipped steps included
        return {"loss": _finite_or_none(loss_v), "grad_norm": _finite_or_none(gnorm_v),
                "lr": self.sched.get_last_lr()[0], "skipped": reason is not None, "skip_reason": reason,
                **_solve_row(solve_v[:3], "fwd"), **_solve_row(solve_v[3:], "bwd")}

    def _average_buffers(self) -> None:
        """BatchNorm running statistics drift apart per rank (DDP only re-broadcasts them at the next
        forward): average them so every rank evaluates and saves the same model."""
        if self.world == 1:
            return
        for buf in self.model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(self.world)

    def run_eval(self) -> dict:
        self._average_buffers()
        model = self.model
        if self.ema is not None:
            model = LDEQ(self.model.cfg).to(self.device)
            self.ema.copy_to(model)
        res = {}
        for split, ds in self.eval_sets.items():
            r = evaluate(model, ds, self.cfg.eval_batch_size, self.device)
            res[split] = r
            self._log({"kind": "eval", "step": self.step, "split": split, **r})
        return res

    def _count_skip(self, row: dict) -> None:
        if not row["skipped"]:
            self.skipped_in_a_row = 0
            return
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        self._log({"kind": "skip", "step": self.step, "reason": row["skip_reason"], "loss": row["loss"],
                   "grad_norm": row["grad_norm"], "skipped_steps": self.skipped_steps,
                   "skipped_in_a_row": self.skipped_in_a_row})
        if self.skipped_in_a_row > self.cfg.max_consecutive_skips:
            first = self.step - self.skipped_in_a_row + 1
            raise FloatingPointError(
                f"training stopped at step {self.step}: steps {first}..{self.step} ({self.skipped_in_a_row} in a "
                f"row, more than max_consecutive_skips={self.cfg.max_consecutive_skips}) were skipped, the last for: "
                f"{row['skip_reason']}; the model diverged or the data is bad (try a lower lr, more warm-up or a "
                f"smaller grad_clip). Nothing from those steps was applied: {self.ckpt_path} holds the last "
                f"checkpoint")

    def fit(self, stop_at: int | None = None) -> dict | None:
        """Train to ``cfg.steps``; ``stop_at`` interrupts after that step (checkpoint written, returns None),
        as a crash would, for resume tests."""
        cfg = self.cfg
        steps_per_epoch = len(self.train_set) // cfg.batch_size
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            epoch, offset = divmod(self.step, steps_per_epoch)
            for batch in self._loader(epoch, offset):
                row = self.train_step(batch)
                self.step += 1
                self._count_skip(row)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log({"kind": "train", "step": self.step, "time_s": time.perf_counter() - t0, **row,
                               "skipped_steps": self.skipped_steps})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss="skipped" if row["skipped"] else f"{row['loss']:.4f}")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or self.step == stop_at:
                    self.save_checkpoint()
                if self.step == stop_at:
                    if bar is not None:
                        bar.close()
                    return None
                if self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.run_eval()
                if self.step >= cfg.steps:
                    break
        if bar is not None:
            bar.close()
        final = self.run_eval()
        if self.rank == 0:
            export = LDEQ(self.model.cfg)
            export.load_state_dict(self.model.state_dict())
            if self.ema is not None:
                self.ema.copy_to(export)
            save_weights(export, self.out, "model")
            plot_curves(self.log_path, self.out / "curves.png")
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if cfg.save_rank_weights:
            atomic_torch_save(self.model.state_dict(), self.out / f"rank{self.rank}_weights.pt")
        if self.world > 1:
            dist.barrier()
        return final


def train(cfg: TrainConfig | dict, device: str | None = None) -> dict:
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    trainer = Trainer(cfg, device)
    try:
        return trainer.fit()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override fields, e.g. steps=200 model_preset=small model.max_iters=6")
    p.add_argument("--out", default=None, help="output folder (TrainConfig.out_dir)")
    p.add_argument("--device", default=None)


def cmd_train(a) -> int:
    d = json.loads(Path(a.config).read_text()) if a.config else {}
    over = parse_overrides(a.set)
    d.update({k: v for k, v in over.items() if k != "model"})
    if "model" in over:
        d["model"] = {**d.get("model", {}), **over["model"]}
    if a.out:
        d["out_dir"] = a.out
    res = train(TrainConfig.from_dict(d), a.device)
    if int(os.environ.get("RANK", "0")) == 0:
        for split, r in res.items():
            print(f"{split}: NME {100 * r['nme']:.2f}%  FR@0.1 {100 * r['fr']:.2f}%  AUC@0.1 {r['auc']:.4f}  "
                  f"iters {r['iters']:.1f}  (n={r['n']})")
    return 0
