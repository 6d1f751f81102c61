"""The training loop: :class:`Trainer` (steps, EMA, loss, skipped steps, checkpoints and exact resume) and
:func:`train`.

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

import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldeq_fast.model.checkpoint import TRAIN_CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save
from ldeq_fast.model.ldeq import LDEQ
from ldeq_fast.model.weights import save_weights
from ldeq_fast.train.config import RESUME_FREE_KEYS, TrainConfig, config_differences
from ldeq_fast.train.data import CachedDataset, build_dataset, collate, epoch_batches
from ldeq_fast.train.evaluation import evaluate
from ldeq_fast.train.plots import plot_curves


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
        return DataLoader(self.train_set, batch_sampler=mine, num_workers=self.cfg.num_workers, collate_fn=collate)

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
