"""ldeq_fast's own weights format: ``{name}.pt`` (a pure state_dict, tensors only) and ``{name}.json`` beside
it: ``{"format": "ldeq_fast.weights/2", "weights_blake2b": <digest of the .pt>, "config": <LDEQConfig>}``.

The two files are one pair.  :func:`save_weights` writes the new weights to ``.{name}.pt.pending``, then
replaces the JSON (naming the new weights' digest), then renames the pending file over ``{name}.pt``; each
step is an atomic rename.  A crash therefore leaves either the old pair, or the new JSON with the new
weights complete under the pending name: :func:`load_weights` checks the digest and, in that second case,
finishes the rename; any other mismatch is an error, never a model built from one save's config and
another's weights.  (A JSON without the digest, e.g. a flat LDEQConfig dict as earlier versions wrote it,
loads without the pair check.)

Loading uses ``torch.load(weights_only=True)``: nothing in the file can run code."""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch

from ldeq_fast.config import LDEQConfig
from ldeq_fast.model.checkpoint import (
    CheckpointError,
    atomic_write,
    digest,
    file_digest,
    fsync_dir,
    load_state_dict_strict,
    write_synced,
)

WEIGHTS_FORMAT = "ldeq_fast.weights/2"


def _pending(weights: Path) -> Path:
    return weights.with_name(f".{weights.name}.pending")


def save_weights(model, folder, name: str = "model") -> tuple[Path, Path]:
    """``{folder}/{name}.pt`` (state_dict) and ``{folder}/{name}.json`` (the LDEQConfig), written as one
    pair (see the module docstring).  One writer per pair at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / f"{name}.pt", folder / f"{name}.json"
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    pending = _pending(weights)
    write_synced(pending, lambda fh: torch.save(sd, fh))
    doc = {"format": WEIGHTS_FORMAT, "weights_blake2b": file_digest(pending), "config": model.cfg.to_dict()}
    text = json.dumps(doc, indent=1).encode()
    atomic_write(config, lambda fh: fh.write(text))   # 1: the config names the new weights
    os.replace(pending, weights)                      # 2: the new weights take their name
    fsync_dir(folder)
    return weights, config


def _read_config(cfg_path: Path) -> tuple[dict, str | None]:
    """(LDEQConfig dict, weights digest or None for a pre-pair JSON)."""
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not a readable JSON config ({exc})") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(doc).__name__}")
    if "format" not in doc:
        return doc, None
    if doc["format"] != WEIGHTS_FORMAT or not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"{cfg_path}: unknown weights config format {doc.get('format')!r} "
                              f"(this version reads {WEIGHTS_FORMAT!r})")
    return doc["config"], doc.get("weights_blake2b")


def _paired_weights(path: Path, cfg_path: Path, expected: str | None) -> bytes:
    """The bytes of the weights file that belongs to the config, finishing an interrupted save."""
    pending = _pending(path)
    data = path.read_bytes() if path.is_file() else None
    if expected is None or (data is not None and digest(data) == expected):
        if data is None:
            raise CheckpointError(f"weights not found: {path}")
        return data
    if pending.is_file() and file_digest(pending) == expected:
        try:
            os.replace(pending, path)
        except OSError as exc:
            raise CheckpointError(f"{path}: an interrupted save_weights left the weights that belong to "
                                  f"{cfg_path} in {pending}, and renaming it failed ({exc})") from exc
        warnings.warn(f"{path}: finished an interrupted save_weights (renamed {pending.name})", stacklevel=3)
        return path.read_bytes()
    if data is None:
        raise CheckpointError(f"weights not found: {path}")
    raise CheckpointError(f"{path} does not belong to {cfg_path}: the config was written for other weights "
                          f"(digest mismatch); save the model again with save_weights")


def load_weights(path, map_location="cpu", init="auto", **config_overrides):
    """Load an LDEQ saved by :func:`save_weights`; ``path`` is the .pt file (the .json sits beside it).
    ``init``: the learned initial state, by default ``<stem>.init.pt`` beside it when present (a path: that
    file; None: none); see ldeq_fast/model/init_state.py."""
    from ldeq_fast.model.ldeq import LDEQ

    path = Path(path)
    cfg_path = path.with_suffix(".json")
    if not path.is_file() and not _pending(path).is_file():
        raise CheckpointError(f"weights not found: {path}")
    if not cfg_path.is_file():
        raise CheckpointError(f"config not found beside the weights: {cfg_path} (load_weights reads the "
                              f"{path.stem}.pt + {path.stem}.json pair that save_weights writes)")
    cfg_dict, expected = _read_config(cfg_path)
    try:
        cfg = LDEQConfig.from_dict({**cfg_dict, **config_overrides})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc
    data = _paired_weights(path, cfg_path, expected)
    try:
        sd = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt or unsafe weights file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    model = LDEQ(cfg)
    load_state_dict_strict(model, sd, source=str(path))
    from ldeq_fast.model.init_state import attach_initial_state

    return attach_initial_state(model.eval(), path, init)
