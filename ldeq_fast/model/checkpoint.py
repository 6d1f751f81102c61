"""Checkpoint primitives shared by ldeq_fast's own weights format (model/weights.py), the published-format
import (model/published.py) and training (train.py): the error type, atomic writes, strict loading.

Nothing here knows a file format, so every format module imports this one and none imports another."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

# the "format" entry of a training checkpoint (train.py's last.pt): other loaders recognise one by it
TRAIN_CHECKPOINT_FORMAT = "ldeq_fast.train/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or not matching the model."""


def fsync_dir(folder) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse a directory fsync)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def temp_path(path: Path) -> Path:
    """A hidden per-process temporary name beside ``path`` (same folder: the rename stays atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_synced(path: Path, write) -> None:
    """``write(fh)`` into ``path`` (binary), flushed and fsynced before returning."""
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path, write) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def digest(data: bytes) -> str:
    """BLAKE2b hex digest (ties a weights file to the config written with it)."""
    return hashlib.blake2b(data).hexdigest()


def file_digest(path) -> str:
    """:func:`digest` of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "blake2b").hexdigest()


def _describe(v) -> str:
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}, not a tensor"


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load with every missing, unexpected or mis-shaped key named in the error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape_bad = sorted(f"{k}: checkpoint {_describe(state_dict[k])} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state_dict)
                       if not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != own[k].shape)
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shape_bad:
            parts.append(f"shape mismatches ({len(shape_bad)}): {shape_bad}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    for k, v in state_dict.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: parameter {k} contains NaN or inf")
    model.load_state_dict(state_dict, strict=True)
