"""Training data: the datasets a TrainConfig names, the epoch order (a pure function of seed and epoch), an
in-memory cache and the batch collation."""
from __future__ import annotations

import zlib

import numpy as np
import torch

from ldeq_fast.train.config import TrainConfig


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


def collate(items):
    return {"image": torch.stack([it["image"] for it in items]), "kpts": torch.stack([it["kpts"] for it in items])}
