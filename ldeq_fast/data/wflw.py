"""WFLW readers: the pre-cropped layout the published evaluation reads, and the original annotation lists
cropped on the fly.  Both return ``{'image': (3,S,S) float32 normalised, 'kpts': (98,2) float32 in [0,1],
'path': str}`` (plus ``'attributes'`` for the original lists).

Pre-cropped layout: ``{root}/{split}.txt`` with lines ``relpath x0 y0 ... x97 y97`` (coordinates in [0,1]
of the S x S image ``{root}/{split}/{relpath}``).

Original layout: ``list_98pt_rect_attr_{train,test}.txt`` lines of 196 landmark coordinates (pixels),
a box ``x_min y_min x_max y_max``, six 0/1 attribute flags and the image path relative to ``WFLW_images/``.

Both readers check, when built, that every listed image file exists (a missing one is reported with the
count and the first few paths), so a broken download fails at once rather than hours into training.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ldeq_fast.data.augment import AugmentConfig, augment
from ldeq_fast.data.transforms import affine_from_points, apply_affine, normalize_image, pad_crop, warp

N_POINTS = 98
ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
# test split name -> attribute flag that selects it
SUBSETS = {
    "largepose": "pose",
    "expression": "expression",
    "illumination": "illumination",
    "makeup": "makeup",
    "occlusion": "occlusion",
    "blur": "blur",
}
CROPPED_SPLITS = ("train", "test") + tuple(f"test_{s}" for s in SUBSETS)


class AnnotationError(ValueError):
    """A malformed annotation line; the message names the file and the 1-based line number."""


def _parse_floats(tokens: list[str], path: Path, lineno: int, first_index: int) -> np.ndarray:
    out = np.empty(len(tokens), dtype=np.float64)
    for i, tok in enumerate(tokens):
        try:
            out[i] = float(tok)
        except ValueError:
            raise AnnotationError(
                f"{path}:{lineno}: token {first_index + i + 1} is not a number: {tok!r}") from None
        if not np.isfinite(out[i]):
            raise AnnotationError(f"{path}:{lineno}: token {first_index + i + 1} is not finite: {tok!r}")
    return out


def _annotation_lines(path: Path):
    """(line number, tokens) of the non-blank lines of an annotation file."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if tokens:
                yield lineno, tokens


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    """An image file as uint8 RGB (H,W,3); with ``size``, it must be size x size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"could not decode image file: {path}")
    if size is not None and bgr.shape[:2] != (size, size):
        raise ValueError(f"image {path} is {bgr.shape[1]}x{bgr.shape[0]} (WxH); expected {size}x{size}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_files_exist(paths: list[Path], what: str, listed_in: Path, show: int = 5) -> None:
    """FileNotFoundError naming the count and the first few of ``paths`` that are not files."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        first = ", ".join(map(str, missing[:show]))
        more = f" (and {len(missing) - show} more)" if len(missing) > show else ""
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} {what} listed in {listed_in} are missing: "
                                f"{first}{more}")


class _Augmented(Dataset):
    """Per-item augmentation seeded by (seed, epoch, index): deterministic, worker-independent, and new
    draws each epoch once ``set_epoch`` is called."""

    def __init__(self, augment_config: AugmentConfig | None, seed: int):
        if augment_config is not None and not isinstance(augment_config, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment_config).__name__}")
        self.augment_config = augment_config
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _finish(self, image: np.ndarray, kpts: np.ndarray, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop uint8, kpts normalised to the crop) -> (normalised image, kpts clipped to [0,1])."""
        if self.augment_config is not None:
            size = np.array([image.shape[1], image.shape[0]], dtype=np.float64)
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, px = augment(image, kpts * size, rng, self.augment_config)
            kpts = px / size
        kpts = np.clip(kpts, 0.0, 1.0).astype(np.float32)
        return normalize_image(image), torch.from_numpy(kpts)


class WFLWCropped(_Augmented):
    """Pre-cropped WFLW (``{root}/{split}.txt`` + ``{root}/{split}/``), loaded as the published evaluation
    does: landmarks overflowing the crop trigger :func:`pad_crop`, ground truth is clipped to [0,1].

    ``augment``: an :class:`AugmentConfig` to augment each item (training), seeded by (seed, epoch, index).
    """

    def __init__(self, root, split: str = "test", augment: AugmentConfig | None = None, seed: int = 0,
                 image_size: int = 256):
        super().__init__(augment, seed)
        self.root = Path(root)
        self.split = split
        self.image_size = int(image_size)
        self.list_file = self.root / f"{split}.txt"
        if not self.list_file.is_file():
            raise FileNotFoundError(
                f"WFLW split file not found: {self.list_file} (known splits: {', '.join(CROPPED_SPLITS)})")
        paths, kpts = [], []
        for lineno, tokens in _annotation_lines(self.list_file):
            if len(tokens) != 1 + 2 * N_POINTS:
                raise AnnotationError(
                    f"{self.list_file}:{lineno}: expected {1 + 2 * N_POINTS} tokens (image path + "
                    f"{2 * N_POINTS} coordinates), got {len(tokens)}")
            paths.append(tokens[0])
            kpts.append(_parse_floats(tokens[1:], self.list_file, lineno, 1).reshape(N_POINTS, 2))
        if not paths:
            raise AnnotationError(f"{self.list_file}: no annotation lines")
        self.relpaths = paths
        self.kpts = np.stack(kpts).astype(np.float32)
        check_files_exist([self.image_path(i) for i in range(len(paths))], "image files", self.list_file)

    def __len__(self) -> int:
        return len(self.relpaths)

    def image_path(self, index: int) -> Path:
        return self.root / self.split / self.relpaths[index]

    def __getitem__(self, index: int) -> dict:
        path = self.image_path(index)
        image = read_rgb(path, self.image_size)
        image, kpts = pad_crop(image, self.kpts[index])
        image_t, kpts_t = self._finish(image, kpts, index)
        return {"image": image_t, "kpts": kpts_t, "path": str(path)}


def _find_list_file(root: Path, split: str) -> Path:
    name = f"list_98pt_rect_attr_{split}.txt"
    candidates = [root / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / name, root / name]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"WFLW annotation list not found; looked for {' and '.join(map(str, candidates))}")


class WFLWOriginal(_Augmented):
    """WFLW from the original annotation lists, each face cropped on the fly with
    :func:`affine_from_points` (square of ``scale`` x the landmark/box extent, resampled to ``size``).

    ``split``: 'train', 'test' or a test subset name 'test_<subset>' (e.g. 'test_largepose');
    ``subset``: alternatively the subset name ('largepose', 'expression', ...) or attribute name ('pose').
    ``cache_dir``: when given, crops are stored there as PNG (lossless) and read back on later accesses.
    Items carry ``'attributes'``: int64 (6,) flags in the order of ``ATTRIBUTES``.
    """

    def __init__(self, root, split: str = "test", subset: str | None = None, size: int = 256,
                 scale: float = 1.2, cache_dir=None, augment: AugmentConfig | None = None, seed: int = 0,
                 list_file=None, image_dir=None):
        super().__init__(augment, seed)
        self.root = Path(root)
        if split.startswith("test_"):
            if subset is not None:
                raise ValueError(f"give the subset either in split ({split!r}) or in subset ({subset!r}), not both")
            split, subset = "test", split[len("test_"):]
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or 'test_<subset>', got {split!r}")
        flag = None
        if subset is not None:
            flag = SUBSETS.get(subset, subset)
            if flag not in ATTRIBUTES:
                raise ValueError(f"unknown WFLW subset {subset!r}; known: {', '.join(SUBSETS)}")
        self.split, self.subset = split, subset
        self.size, self.scale = int(size), float(scale)
        self.list_file = Path(list_file) if list_file is not None else _find_list_file(self.root, split)
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "WFLW_images"
        n_tokens = 2 * N_POINTS + 4 + len(ATTRIBUTES) + 1
        paths, kpts, boxes, attrs, lines = [], [], [], [], []
        for lineno, tokens in _annotation_lines(self.list_file):
            if len(tokens) != n_tokens:
                raise AnnotationError(
                    f"{self.list_file}:{lineno}: expected {n_tokens} tokens ({2 * N_POINTS} coordinates, 4 box "
                    f"values, {len(ATTRIBUTES)} attribute flags, image path), got {len(tokens)}")
            nums = _parse_floats(tokens[:-1], self.list_file, lineno, 0)
            flags = nums[2 * N_POINTS + 4:]
            if not np.isin(flags, (0.0, 1.0)).all():
                raise AnnotationError(f"{self.list_file}:{lineno}: attribute flags must be 0 or 1, got "
                                      f"{tokens[2 * N_POINTS + 4:-1]}")
            paths.append(tokens[-1])
            kpts.append(nums[:2 * N_POINTS].reshape(N_POINTS, 2))
            boxes.append(nums[2 * N_POINTS:2 * N_POINTS + 4])
            attrs.append(flags.astype(np.int64))
            lines.append(lineno)
        if not paths:
            raise AnnotationError(f"{self.list_file}: no annotation lines")
        attrs = np.stack(attrs)
        keep = np.arange(len(paths)) if flag is None else np.flatnonzero(attrs[:, ATTRIBUTES.index(flag)])
        self.relpaths = [paths[i] for i in keep]
        self.line_numbers = [lines[i] for i in keep]
        self.landmarks = np.stack(kpts)[keep]          # (N,98,2) float64, original-image pixels
        self.boxes = np.stack(boxes)[keep]             # (N,4)
        self.attributes = attrs[keep]                  # (N,6) int64
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        check_files_exist([self.image_path(i) for i in range(len(self.relpaths))], "image files", self.list_file)

    def __len__(self) -> int:
        return len(self.relpaths)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.relpaths[index]

    def affine(self, index: int) -> np.ndarray:
        """The (2,3) affine from original-image pixels to crop pixels of item ``index``."""
        return affine_from_points(self.landmarks[index], self.boxes[index], self.scale, self.size)

    def _cache_path(self, index: int) -> Path:
        # keyed by what determines the crop, so a changed size/scale/annotation never reads a stale file
        key = f"{self.relpaths[index]}|{self.landmarks[index].tobytes().hex()}|{self.boxes[index].tolist()}|" \
              f"{self.size}|{self.scale}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{Path(self.relpaths[index]).stem}_{digest}.png"

    def crop(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(crop uint8 (size,size,3) RGB, landmarks (98,2) normalised to the crop), without augmentation."""
        A = self.affine(index)
        kpts = apply_affine(self.landmarks[index], A) / self.size
        cached = self._cache_path(index) if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            bgr = cv2.imread(str(cached), cv2.IMREAD_COLOR)
            if bgr is not None and bgr.shape == (self.size, self.size, 3):
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), kpts
        crop = warp(read_rgb(self.image_path(index)), A, self.size)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # write-then-rename, per process: readers (and other workers) never see half a file
            tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.png")
            if not cv2.imwrite(str(tmp), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write crop cache file {tmp}")
            tmp.replace(cached)
        return crop, kpts

    def __getitem__(self, index: int) -> dict:
        crop, kpts = self.crop(index)
        image_t, kpts_t = self._finish(crop, kpts, index)
        return {"image": image_t, "kpts": kpts_t, "path": str(self.image_path(index)),
                "attributes": torch.from_numpy(self.attributes[index].copy())}


__all__ = ["ATTRIBUTES", "AnnotationError", "CROPPED_SPLITS", "SUBSETS", "WFLWCropped", "WFLWOriginal",
           "read_rgb"]
