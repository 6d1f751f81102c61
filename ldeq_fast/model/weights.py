"""ldeq_fast's own weights format: a pure state_dict (tensors only) plus a JSON config beside it.

Loading uses ``torch.load(weights_only=True)``: nothing in the file can run code."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ldeq_fast.config import LDEQConfig


def atomic_torch_save(obj, path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def save_weights(model, folder, name: str = "model") -> tuple[Path, Path]:
    """``{folder}/{name}.pt`` (state_dict) and ``{folder}/{name}.json`` (the LDEQConfig)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / f"{name}.pt", folder / f"{name}.json"
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(sd, weights)
    tmp = config.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(model.cfg.to_dict(), indent=1))
    os.replace(tmp, config)
    return weights, config


def load_weights(path, map_location="cpu", init="auto", **config_overrides):
    """Load an LDEQ saved by :func:`save_weights`; ``path`` is the .pt file (the .json sits beside it).
    ``init``: the learned initial state, by default ``<stem>.init.pt`` beside it when present (a path: that
    file; None: none); see ldeq_fast/model/init_state.py."""
    from ldeq_fast.model.ldeq import LDEQ
    from ldeq_fast.model.published import CheckpointError, load_state_dict_strict

    path = Path(path)
    cfg_path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    if not cfg_path.is_file():
        raise CheckpointError(f"config not found beside the weights: {cfg_path}")
    try:
        cfg = LDEQConfig.from_dict({**json.loads(cfg_path.read_text()), **config_overrides})
    except (ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc
    try:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt or unsafe weights file ({type(exc).__name__}: {exc})") from exc
    model = LDEQ(cfg)
    load_state_dict_strict(model, sd, source=str(path))
    from ldeq_fast.model.init_state import attach_initial_state

    return attach_initial_state(model.eval(), path, init)
