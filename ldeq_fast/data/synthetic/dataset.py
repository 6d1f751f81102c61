"""``SyntheticFaces``: a deterministic dataset of drawn faces (item i seeded by ``(seed, i)``)."""

from __future__ import annotations

import numpy as np
import torch

from ldeq_fast.data.synthetic.geometry import _hw
from ldeq_fast.data.synthetic.params import DIFFICULTIES, SyntheticFaceParams
from ldeq_fast.data.synthetic.rendering import render_face
from ldeq_fast.data.synthetic.sampling import sample_params
from ldeq_fast.data.transforms import normalize_image


class SyntheticFaces(torch.utils.data.Dataset):
    """n procedurally drawn faces; item i depends only on (seed, i, size, difficulty).

    Items: {'image': float32 (3, size, size) ImageNet-normalised, 'kpts': float32 (98, 2) = pixels / size,
    'index': i}.
    """

    def __init__(self, n: int, size: int = 256, seed: int = 0, difficulty: str = "normal"):
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        if not np.isscalar(size):
            raise ValueError(f"size must be one integer (square images), got {size!r}")
        self.n, self.size, self.seed, self.difficulty = int(n), _hw(size)[0], int(seed), difficulty

    def __len__(self):
        return self.n

    def params(self, i: int) -> SyntheticFaceParams:
        return sample_params(np.random.default_rng((self.seed, i)), self.difficulty)

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} synthetic faces")
        i = int(i) % self.n
        img, lm = render_face(self.params(i), self.size)
        return {"image": normalize_image(img), "kpts": torch.from_numpy(lm / np.float32(self.size)), "index": i}
