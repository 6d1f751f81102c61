"""Typed configuration of an LDEQ model and its solver, with the published defaults."""
from __future__ import annotations

import dataclasses
import functools
import numbers
import random
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

# Keypoint layouts the model accepts (n_keypoints -> name).  98 = WFLW, 68 = 300W, 29 = COFW, 19 = AFLW.
LAYOUTS = {98: "wflw98", 68: "300w68", 29: "cofw29", 19: "aflw19"}
SOLVERS = ("anderson", "fpi", "broyden")
STOP_MODES = ("rel", "abs")
MODEL_MODES = ("implicit", "explicit")
CELL_NORMS = ("softargmax", "linear", "none")
SEMANTICS = ("per_sample", "published")
BACKENDS = ("auto", "torch", "triton", "cpp")   # their rules: ldeq_fast.ops.resolve
LAM_MODES = ("scaled", "absolute")
GRAD_MODES = ("ift", "phantom", "jfb")


class ConfigError(ValueError, TypeError):
    """A config key that is unknown, of the wrong type or out of range; the message names the key.  A
    ValueError and a TypeError both, so the checks' callers catch it either way."""


# ---------------------------------------------------------------------------------------------- field types
_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a float", str: "a str", dict: "a dict", list: "a list"}


@functools.cache
def _field_kinds(cls) -> dict[str, tuple[type, bool]]:
    """field name -> (its one base type among _TYPE_NAMES, None allowed) from the class annotations."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        base = [a for a in args if a is not type(None)]
        if len(base) == 1 and base[0] in _TYPE_NAMES:
            out[name] = (base[0], len(base) < len(args))
    return out


def _coerce(kind: type, v):
    """(ok, value): ``v`` as a value of ``kind``.  bool is not an int here (nor an int a bool), an integral
    number is a float, a tuple a list; numpy scalars count as the Python numbers they hold."""
    if kind is bool:
        return isinstance(v, bool), v
    if isinstance(v, bool):
        return False, v
    if kind is int:
        return isinstance(v, numbers.Integral), int(v) if isinstance(v, numbers.Integral) else v
    if kind is float:
        return isinstance(v, numbers.Real), float(v) if isinstance(v, numbers.Real) else v
    if kind is list and isinstance(v, tuple):
        return True, list(v)
    if kind is dict and isinstance(v, Mapping):
        return True, dict(v)
    return isinstance(v, kind), v


def check_field_types(obj) -> None:
    """ConfigError (a TypeError) naming the key for a dataclass field holding a value of the wrong type, e.g.
    ``LDEQConfig: rel_tol must be a float, got str '5e-3'``; accepted values are normalised in place (an int
    given for a float field becomes a float)."""
    cls = type(obj)
    for f in fields(obj):
        if f.name not in _field_kinds(cls):
            continue
        kind, optional = _field_kinds(cls)[f.name]
        v = getattr(obj, f.name)
        if v is None and optional:
            continue
        ok, value = _coerce(kind, v)
        if not ok:
            raise ConfigError(f"{cls.__name__}: {f.name} must be {_TYPE_NAMES[kind]}{' or None' if optional else ''}, "
                            f"got {type(v).__name__} {v!r}")
        if value is not v:
            setattr(obj, f.name, value)


# ---------------------------------------------------------------------------------------------- solver depth
def forward_depth(max_iters: int, stochastic: bool, training: bool) -> int:
    """The forward solve's iteration budget as the published DEQ layer picks it: with
    ``stochastic_max_iters``, a depth drawn from 1..max_iters in training (one ``random.randint``) and half
    the depth (rounded, >= 1) at evaluation; otherwise ``max_iters``."""
    if not stochastic:
        return int(max_iters)
    return random.randint(1, int(max_iters)) if training else max(1, round(max_iters / 2))


def backward_depth(max_iters: int, stochastic: bool, backward_max_iters: int = 0) -> int:
    """The implicit backward solve's iteration budget: deterministic, never drawn.  ``backward_max_iters``
    when set (> 0); else the published rule, half the depth (rounded, >= 1) with ``stochastic_max_iters``
    and ``max_iters`` without.  ``max_iters`` is the requested depth (the call's or the config's), not the
    forward's random draw: the published backward hook reads ``args.max_iters``."""
    if backward_max_iters:
        return int(backward_max_iters)
    return max(1, round(max_iters / 2)) if stochastic else int(max_iters)


@dataclass
class LDEQConfig:
    # --- architecture (published defaults) ---
    n_keypoints: int = 98
    extra_latent_width: int = 0          # extra z channels beyond the heatmaps ("cell_extra_latent_width")
    injection_width: int = 224
    cell_base_width: int = 224
    cell_width_increment: int = 24
    cell_gn_groups: int = 1
    cell_norm: str = "softargmax"        # heatmap normalisation applied inside the cell
    softargmax_beta: float = 1.0
    learn_softargmax_beta: bool = False
    heatmap_size: int = 64
    im_size: int = 256
    # --- DEQ / solver (published defaults) ---
    model_mode: str = "implicit"
    explicit_depth: int = 5
    cell_use_bn_for_explicit: bool = False
    solver: str = "anderson"
    max_iters: int = 10
    stop_mode: str = "rel"
    rel_tol: float = 5e-3
    abs_tol: float = 5e-3
    anderson_m: int = 6
    anderson_lam: float = 1e-4
    anderson_beta: float = 1.0
    stochastic_max_iters: bool = False
    take_one_less_inference_step: bool = False
    # --- ldeq_fast extensions ---
    solver_semantics: str = "per_sample"  # 'published' reproduces batch-mean stopping for parity runs
    lam_mode: str = "scaled"              # Anderson regulariser relative to the Gram diagonal
    check_every: int = 1                  # host looks at convergence every k iterations (0: never)
    grad_mode: str = "ift"
    phantom_steps: int = 5
    phantom_damping: float = 0.8
    backward_max_iters: int = 0           # 0: the published rule (backward_depth)
    backend: str = "auto"                 # auto | torch | triton | cpp (ldeq_fast.ops.resolve)
    train_recompute: bool = True          # fast path, training: recompute stem + norm epilogues in backward
    channels_last: bool = True            # fast path: NHWC weights and activations (faster convs)
    extra: dict = field(default_factory=dict, repr=False)  # free-form notes (kept in checkpoints)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def z_width(self) -> int:
        return self.n_keypoints + self.extra_latent_width

    @property
    def tol(self) -> float:
        return self.rel_tol if self.stop_mode == "rel" else self.abs_tol

    @property
    def stem_stride(self) -> int:
        return self.im_size // self.heatmap_size

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        check_field_types(self)

        def check(cond, msg):
            if not cond:
                raise ConfigError(f"LDEQConfig: {msg}")

        check(self.n_keypoints in LAYOUTS, f"n_keypoints={self.n_keypoints} is not a known layout {sorted(LAYOUTS)}")
        check(self.extra_latent_width >= 0, "extra_latent_width must be >= 0")
        for name in ("injection_width", "cell_base_width", "heatmap_size", "im_size", "max_iters", "anderson_m"):
            check(int(getattr(self, name)) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        check(self.cell_width_increment >= 0, "cell_width_increment must be >= 0")
        check(self.injection_width % 4 == 0, "injection_width must be a multiple of 4 (stem widths w/4, w/2, w)")
        check(self.im_size == 4 * self.heatmap_size, f"im_size must be 4 x heatmap_size (stem stride 4); got "
              f"{self.im_size} and {self.heatmap_size}")
        check(self.heatmap_size % 16 == 0, "heatmap_size must be a multiple of 16 (4 hourglass poolings)")
        for name in ("cell_base_width",):
            w = getattr(self, name)
            for k in range(5):
                width = w + k * self.cell_width_increment
                check(width % self.cell_gn_groups == 0,
                      f"cell_gn_groups={self.cell_gn_groups} must divide every hourglass width (not {width})")
        check(self.model_mode in MODEL_MODES, f"model_mode must be one of {MODEL_MODES}")
        check(self.cell_norm in CELL_NORMS, f"cell_norm must be one of {CELL_NORMS}")
        check(self.solver in SOLVERS, f"solver must be one of {SOLVERS}")
        check(self.stop_mode in STOP_MODES, f"stop_mode must be one of {STOP_MODES}")
        check(self.solver_semantics in SEMANTICS, f"solver_semantics must be one of {SEMANTICS}")
        check(self.lam_mode in LAM_MODES, f"lam_mode must be one of {LAM_MODES}")
        check(self.grad_mode in GRAD_MODES, f"grad_mode must be one of {GRAD_MODES}")
        check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}")
        check(self.softargmax_beta > 0, "softargmax_beta must be > 0")
        check(self.rel_tol >= 0 and self.abs_tol >= 0, "tolerances must be >= 0")
        check(self.check_every >= 0, "check_every must be >= 0")
        check(self.backward_max_iters >= 0, "backward_max_iters must be >= 0 (0: the published rule)")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LDEQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"LDEQConfig: unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(d))

    def replace(self, **changes) -> "LDEQConfig":
        return LDEQConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def small(cls, **changes) -> "LDEQConfig":
        """A narrow model with the published structure, for tests and quick CPU runs."""
        base = dict(injection_width=32, cell_base_width=32, cell_width_increment=8, heatmap_size=32, im_size=128)
        base.update(changes)
        return cls.from_dict(base)
