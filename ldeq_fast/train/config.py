"""Training settings: :class:`TrainConfig` (typed, validated, unknown keys are errors), the keys a resume
may change, and building a config from a JSON file plus ``key=value`` overrides."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ldeq_fast.config import ConfigError, LDEQConfig, check_field_types

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
            raise ConfigError(f"TrainConfig: data must be one of {DATASETS}, not {self.data!r}")
        if self.data != "synthetic" and not self.data_root:
            raise ConfigError(f"TrainConfig: data={self.data!r} needs data_root")
        if self.model_preset not in ("default", "small"):
            raise ConfigError("TrainConfig: model_preset must be 'default' or 'small'")
        if self.loss not in ("l1", "l2"):
            raise ConfigError("TrainConfig: loss must be 'l1' or 'l2'")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError("TrainConfig: amp must be auto|bf16|off")
        for name in ("steps", "batch_size", "eval_every", "ckpt_every", "log_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"TrainConfig: {name} must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("TrainConfig: ema_decay must be in [0, 1)")
        if self.max_consecutive_skips < 0:
            raise ConfigError("TrainConfig: max_consecutive_skips must be >= 0")
        self.model_config()  # validates the model overrides (unknown keys are errors)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown config key(s) {unknown}; known keys: {sorted(known)}")
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
            raise ConfigError(f"override {pair!r} is not key=value")
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


def config_from_sources(config_file=None, overrides: list[str] = (), out_dir: str | None = None) -> TrainConfig:
    """A TrainConfig from a JSON file of fields (optional), ``key=value`` overrides on top (``model.key=value``
    merges into the model overrides) and an output folder; errors name the file or key."""
    d = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of TrainConfig fields, got {type(d).__name__}")
    over = parse_overrides(list(overrides))
    d.update({k: v for k, v in over.items() if k != "model"})
    if "model" in over:
        d["model"] = {**d.get("model", {}), **over["model"]}
    if out_dir:
        d["out_dir"] = out_dir
    return TrainConfig.from_dict(d)
