"""Fit a learned initial state h for a trained LDEQ, without labels (``ldeq-fast fit-init``).

Targets are the model's own converged keypoints (``converged_iters`` solver iterations from zeros, plus the
extra step); the stem and the cell stay frozen.  Two stages:

1. maps (cheap, no cell evaluation): the keypoints of h's heatmaps (before the confidence) are fitted to
   the targets, which shapes its logits quickly;
2. unrolled: the keypoints after j = 1 .. ``unroll`` cell evaluations from z0 = h(x) are fitted to the
   targets, the error back-propagated through those evaluations; this is where the confidence learns how
   far the cell should trust the maps.

Losses are the NME against the targets (what ``ldeq-fast bench --accuracy`` reports).  A held-out share of
the images picks the best checkpoint: the NME against the converged answer of the model's own inference at
``select_evals`` cell evaluations from h.  Any face crops will do (no labels), or synthetic faces.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldeq_fast.accuracy import (
    CONVERGED_ITERS,
    converged_keypoints,
    distance_to,
    nme_normaliser,
    predict,
    setting_for,
)
from ldeq_fast.model.init_state import InitConfig, init_cost_flops, new_initial_state
from ldeq_fast.ops.heatmap import heatmap_keypoints_ref

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class FitConfig:
    map_steps: int = 600            # stage 1: h's own maps
    steps: int = 300                # stage 2: through the unrolled cell
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    unroll: int = 3                 # cell evaluations from h(x) the stage-2 loss looks through
    map_weight: float = 0.1         # stage 2: weight of h's own maps' keypoints (the unrolled ones weigh 1 each)
    converged_iters: int = CONVERGED_ITERS
    val_fraction: float = 0.1
    eval_every: int = 50
    select_evals: int = 2           # the budget (cell evaluations incl. the extra step) the checkpoint is picked at
    cache_mb: int = 1024            # keep the stem's injections in memory when they fit in this many MB
    seed: int = 0
    init: dict = field(default_factory=dict)   # InitConfig fields (default: InitConfig.for_model)

    def __post_init__(self):
        for name in ("batch_size", "unroll", "converged_iters", "eval_every", "select_evals"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FitConfig: {name} must be >= 1 (got {getattr(self, name)})")
        if self.map_steps < 0 or self.steps < 0 or self.map_steps + self.steps < 1:
            raise ValueError("FitConfig: map_steps and steps must be >= 0, and not both 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"FitConfig: val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.map_weight < 0:
            raise ValueError("FitConfig: lr must be > 0 and map_weight >= 0")


def load_image_folder(folder, size: int, limit: int | None = None, report=print) -> torch.Tensor:
    """Every image under ``folder`` (recursively) as a face crop: the centred square, resized to ``size``,
    ImageNet-normalised, (N, 3, size, size).  Unreadable files are reported by name and skipped."""
    import cv2

    from ldeq_fast.data.transforms import normalize_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    out, skipped = [], []
    for p in files[:limit]:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None or img.size == 0:
            skipped.append(p)
            continue
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_LINEAR)
        out.append(normalize_image(np.ascontiguousarray(img[:, :, ::-1])))
    for p in skipped:
        report(f"skipped unreadable image {p}")
    if not out:
        raise ValueError(f"none of the {len(files)} image files under {folder} could be read")
    return torch.stack(out)


def synthetic_images(n: int, size: int, seed: int, difficulty: str = "hard", progress: bool = True) -> torch.Tensor:
    from ldeq_fast.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(n, size=size, seed=seed, difficulty=difficulty)
    items = range(n)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="rendering faces", unit="image", leave=False)
    return torch.stack([faces[i]["image"] for i in items])


def _nme_to(kp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Differentiable batch mean of the NME of keypoints against targets (eps keeps the sqrt's gradient finite)."""
    d = ((kp - targets).square().sum(-1) + 1e-12).sqrt().mean(-1)
    return (d / nme_normaliser(targets).clamp_min(1e-6)).mean()


def _loss(m, h, x, targets, cfg: FitConfig, unrolled: bool) -> torch.Tensor:
    centres, confidence = h.parts(x)
    map_err = _nme_to(centres[:, : m.cfg.n_keypoints] / m.cfg.heatmap_size, targets)  # the peaks' keypoints
    if not unrolled:
        return map_err
    z = h.render(centres, confidence)
    f = m.cell_fn(x)
    loss = cfg.map_weight * map_err
    for _ in range(cfg.unroll):
        z = f(z)
        loss = loss + _nme_to(heatmap_keypoints_ref(m.heatmaps_from_z(z))[0], targets)
    return loss / (cfg.map_weight + cfg.unroll)


class _Injections:
    """The frozen stem's outputs for a set of images: computed once and kept when they fit in ``cache_mb``,
    else recomputed per batch."""

    def __init__(self, m, images: torch.Tensor, cache_mb: int, device):
        c = m.cfg
        self.m, self.images, self.device = m, images, device
        per_image = c.injection_width * c.heatmap_size ** 2 * next(m.parameters()).element_size()
        self.cache = None
        if per_image * len(images) <= cache_mb * 2 ** 20:
            with torch.no_grad():
                self.cache = torch.cat([m.injection(images[i:i + 64].to(device)).contiguous()
                                        for i in range(0, len(images), 64)])

    def __getitem__(self, idx):
        if self.cache is not None:
            return self.cache[idx.to(self.cache.device)]
        with torch.no_grad():
            return self.m.injection(self.images[idx].to(self.device)).contiguous()


def fit_initial_state(model, images: torch.Tensor, cfg: FitConfig | None = None, progress: bool = True,
                      report=print, targets: torch.Tensor | None = None):
    """Fit h for ``model`` on ``images`` (N, 3, S, S).  Returns (h, report dict).  ``model`` is not changed.
    ``targets``: the converged keypoints (N, K, 2) when already computed (``accuracy.converged_keypoints``)."""
    cfg = cfg or FitConfig()
    c = model.cfg
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, c.im_size, c.im_size):
        raise ValueError(f"images must be (N, 3, {c.im_size}, {c.im_size}), got {tuple(images.shape)}")
    n = len(images)
    n_val = max(1, int(round(cfg.val_fraction * n)))
    if n - n_val < 1:
        raise ValueError(f"need at least 2 images to fit and validate, got {n}")
    device = next(model.parameters()).device
    t_start = time.time()
    m = copy.deepcopy(model).eval()
    m.set_initial_state(None)
    m.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=gen)
    val_idx, train_idx = perm[:n_val], perm[n_val:]

    if targets is None:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=f"converged answers ({cfg.converged_iters} iterations)", unit="image",
                       leave=False)
        targets = converged_keypoints(m, images, cfg.converged_iters, bar=bar)
        if bar is not None:
            bar.close()
    elif tuple(targets.shape) != (n, c.n_keypoints, 2):
        raise ValueError(f"targets must be (N, K, 2) = {(n, c.n_keypoints, 2)}, got {tuple(targets.shape)}")
    t_targets = time.time() - t_start

    h = new_initial_state(m, InitConfig(**cfg.init) if cfg.init else None).to(device)
    cost = init_cost_flops(m, h)
    if cost["ratio"] > 0.15:
        report(f"warning: this initial state costs {cost['ratio']:.2f} cell evaluations (> 0.15); a smaller "
               "width or fewer levels keep it cheap")
    x_all = _Injections(m, images, cfg.cache_mb, device)
    x_val, t_val = images[val_idx], targets[val_idx]
    budgets = sorted({1, 2, 3, cfg.select_evals})
    m.set_initial_state(h)

    def validate() -> dict:
        h.eval()
        out = {e: float(distance_to(predict(m, x_val, setting_for(e, c.solver), init=True), t_val).mean())
               for e in budgets}
        h.train()
        return out

    baseline = {e: float(distance_to(predict(m, x_val, setting_for(e, c.solver), init=False), t_val).mean())
                for e in budgets}
    history, best, best_state = [], math.inf, None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.map_steps + cfg.steps, desc="fitting the initial state", unit="step", leave=False)
    h.train()
    for stage, n_steps in (("maps", cfg.map_steps), ("unrolled", cfg.steps)):
        if n_steps == 0:
            continue
        opt = torch.optim.AdamW(h.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(1, n_steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, n=n_steps, w=warm: min(1.0, (s + 1) / w) * (0.02 + 0.49 * (1 + math.cos(math.pi * s / n))))
        running = first = None
        for step in range(n_steps):
            idx = train_idx[torch.randint(len(train_idx), (min(cfg.batch_size, len(train_idx)),), generator=gen)]
            loss = _loss(m, h, x_all[idx], targets[idx].to(device), cfg, unrolled=stage == "unrolled")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fit-init: the {stage} loss became {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0)
            opt.step()
            sched.step()
            value = float(loss.detach())
            first = value if first is None else first
            running = value if running is None else 0.95 * running + 0.05 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{100 * running:.2f}%")
            if stage == "unrolled" and ((step + 1) % cfg.eval_every == 0 or step + 1 == n_steps):
                val = validate()
                history.append({"step": step + 1, "train_loss": running, "val_vs_converged": val})
                if val[cfg.select_evals] < best:
                    best, best_state = val[cfg.select_evals], copy.deepcopy(h.state_dict())
        history.append({"stage": stage, "steps": n_steps, "first_loss": first, "train_loss": running})
    if bar is not None:
        bar.close()
    if best_state is None:          # maps only: the last state
        best_state = copy.deepcopy(h.state_dict())
    h.load_state_dict(best_state)
    final = validate()
    h.eval()   # validate() leaves it in training mode
    rep = {"fit": asdict(cfg), "images": n, "train_images": len(train_idx), "val_images": n_val,
           "model_solver": c.solver, "cost": cost, "val_vs_converged": {str(k): v for k, v in final.items()},
           "val_vs_converged_from_zeros": {str(k): v for k, v in baseline.items()}, "history": history,
           "seconds": {"targets": t_targets, "total": time.time() - t_start}}
    return h.cpu(), rep
