"""Import of published LDEQ checkpoints: ``{'args': argparse.Namespace, 'state_dict': {...}}``.

The file is read with ``torch.load(weights_only=True)`` and an explicit allow-list (only
``argparse.Namespace`` beyond tensors and plain containers), so a checkpoint cannot run pickled code.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import zipfile

import torch

from ldeq_fast.config import LDEQConfig
from ldeq_fast.model.checkpoint import (
    TRAIN_CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_torch_save,
    load_state_dict_strict,
)

__all__ = ["CheckpointError", "read_checkpoint", "published_args_to_config", "load_state_dict_strict",
           "load_published", "save_published"]

SAFE_GLOBALS = [argparse.Namespace]

# published args field -> LDEQConfig field
_ARG_MAP = {
    "n_keypoints": "n_keypoints",
    "cell_extra_latent_width": "extra_latent_width",
    "injection_width": "injection_width",
    "cell_base_width": "cell_base_width",
    "cell_width_increment": "cell_width_increment",
    "cell_gn_groups": "cell_gn_groups",
    "cell_norm": "cell_norm",
    "cell_softargmax_beta": "softargmax_beta",
    "heatmap_size": "heatmap_size",
    "im_size": "im_size",
    "model_mode": "model_mode",
    "explicit_depth": "explicit_depth",
    "cell_use_bn_for_explicit": "cell_use_bn_for_explicit",
    "solver": "solver",
    "stop_mode": "stop_mode",
    "rel_diff_target": "rel_tol",
    "abs_diff_target": "abs_tol",
    "anderson_m": "anderson_m",
    "anderson_lam": "anderson_lam",
    "anderson_beta": "anderson_beta",
    "max_iters": "max_iters",
    "stochastic_max_iters": "stochastic_max_iters",
    "take_one_less_inference_step": "take_one_less_inference_step",
}
_BOOL_FIELDS = {f.name for f in dataclasses.fields(LDEQConfig) if f.type in ("bool", bool)}
_REQUIRED = ("n_keypoints", "injection_width", "cell_base_width", "cell_width_increment", "heatmap_size")


def read_checkpoint(path, map_location="cpu") -> dict:
    """Weights-only load of a published-format checkpoint, with clear errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_onnx(path):
        raise CheckpointError(_not_published(path, "an ONNX export of a model (ldeq_fast/export.py)",
                                             "run it with onnxruntime, or load the weights it was exported from"))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to unpickle an object that is not on the allow-list "
                              f"(tensors, containers, argparse.Namespace): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 -- the unpickler fails on garbage bytes with any error (IndexError, ...)
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "args" not in ckpt:
        raise CheckpointError(_not_published(path, *_what_it_is(path, ckpt)))
    return ckpt


def _not_published(path, what: str, advice: str) -> str:
    return f"{path} is {what}, not a published LDEQ checkpoint: {advice}"


def _is_onnx(path: str) -> bool:
    """An ONNX model: a protobuf ModelProto (field 1, ir_version, first) naming an ONNX opset domain."""
    if path.lower().endswith(".onnx"):
        return True
    with open(path, "rb") as fh:
        head = fh.read(4096)
    return head[:1] == b"\x08" and (b"onnx" in head or b"pytorch" in head) and not zipfile.is_zipfile(path)


def _what_it_is(path: str, obj) -> tuple[str, str]:
    """What a file that load_published cannot use holds, and what loads it."""
    from ldeq_fast.model.init_state import FORMAT as INIT_FORMAT

    if isinstance(obj, dict) and obj.get("format") == TRAIN_CHECKPOINT_FORMAT:
        return ("an ldeq_fast training checkpoint (last.pt)", "load the run's exported model.pt with "
                "ldeq_fast.model.load_weights (written when training finishes), or resume training from it")
    if isinstance(obj, dict) and obj.get("format") == INIT_FORMAT:
        return ("a learned initial state (an init file, <model>.init.pt: the solver's start z0 = h(x), not a model)",
                "load the model itself (load_weights or load_published), which picks up the <stem>.init.pt beside "
                "it, or name this file with init=...")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        cfg = os.path.splitext(path)[0] + ".json"
        if os.path.isfile(cfg):
            return (f"an ldeq_fast weights file (a state_dict of {len(obj)} tensors; its config is {cfg})",
                    "load it with ldeq_fast.model.load_weights")
        return (f"a bare state_dict of {len(obj)} tensors ({list(obj)[:3]} ...) with no model configuration",
                f"ldeq_fast weights would have {os.path.basename(cfg)} beside them for "
                f"ldeq_fast.model.load_weights; a published checkpoint holds 'args' and 'state_dict'")
    if isinstance(obj, dict) and "state_dict" in obj:
        return (f"a dict with 'state_dict' but no 'args' (keys {list(obj)[:10]})",
                "without the published 'args' the model configuration is unknown")
    what = f"a dict with keys {list(obj)[:10]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    return what, "expected a dict with 'args' and 'state_dict'"


def published_args_to_config(args, **overrides) -> LDEQConfig:
    """Map a published ``args`` namespace (or dict) to an LDEQConfig; training-only fields are ignored."""
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    missing = [k for k in _REQUIRED if k not in a]
    if missing:
        raise CheckpointError(f"published args lack required field(s) {missing}")
    if a.get("cell_name", "Cell0") != "Cell0":
        raise CheckpointError(f"unsupported cell_name {a['cell_name']!r} (only the published 'Cell0')")
    if a.get("z0_mode", "zeros") != "zeros":
        raise CheckpointError(f"unsupported z0_mode {a['z0_mode']!r} (the published code only implements 'zeros')")
    d = {ours: a[theirs] for theirs, ours in _ARG_MAP.items() if theirs in a}
    if "cell_norm" in d:
        d["cell_norm"] = str(d["cell_norm"]).lower()
    if a.get("cell_learn_softargmax_beta", False) and d.get("cell_norm", "softargmax") == "softargmax":
        # the published learnable beta was never a registered parameter: it stayed softplus(beta) forever
        d["softargmax_beta"] = float(torch.nn.functional.softplus(torch.tensor(float(d.get("softargmax_beta", 1.0)))))
    z_width = a.get("z_width")
    if z_width is not None and z_width != d["n_keypoints"] + d.get("extra_latent_width", 0):
        raise CheckpointError(f"published args: z_width={z_width} != n_keypoints + cell_extra_latent_width")
    for k, v in d.items():   # an argparse type=int flag stored 0/1 for a switch: the published code reads truthiness
        if k in _BOOL_FIELDS and not isinstance(v, bool) and v in (0, 1):
            d[k] = bool(v)
    d.update(overrides)
    try:
        return LDEQConfig.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"published args do not describe a valid model: {exc}") from exc


def _strip_prefix(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_published(path, map_location="cpu", init="auto", **config_overrides):
    """Build an LDEQ from a published checkpoint file and load its weights strictly (eval mode).  ``init``: the
    learned initial state, as in ``load_weights`` (default: ``<stem>.init.pt`` beside the checkpoint if present)."""
    from ldeq_fast.model.ldeq import LDEQ

    ckpt = read_checkpoint(path, map_location)
    cfg = published_args_to_config(ckpt["args"], **config_overrides)
    model = LDEQ(cfg)
    load_state_dict_strict(model, _strip_prefix(ckpt["state_dict"]), source=os.fspath(path))
    from ldeq_fast.model.init_state import attach_initial_state

    return attach_initial_state(model.eval(), path, init)


def save_published(model, path, **extra_args) -> None:
    """Write ``model`` in the published checkpoint format (args namespace + state_dict)."""
    c = model.cfg
    args = argparse.Namespace(
        landmark_model_name="ldeq", cell_name="Cell0", model_mode=c.model_mode, explicit_depth=c.explicit_depth,
        injection_width=c.injection_width, cell_base_width=c.cell_base_width,
        cell_width_increment=c.cell_width_increment, cell_gn_groups=c.cell_gn_groups,
        cell_use_bn_for_explicit=c.cell_use_bn_for_explicit, cell_norm="None" if c.cell_norm == "none" else c.cell_norm,
        cell_softargmax_beta=c.softargmax_beta, cell_learn_softargmax_beta=False, n_keypoints=c.n_keypoints,
        cell_extra_latent_width=c.extra_latent_width, z_width=c.z_width, heatmap_size=c.heatmap_size,
        im_size=c.im_size, z0_mode="zeros", solver=c.solver, stop_mode=c.stop_mode, abs_diff_target=c.abs_tol,
        rel_diff_target=c.rel_tol, anderson_m=c.anderson_m, anderson_lam=c.anderson_lam,
        anderson_beta=c.anderson_beta, max_iters=c.max_iters, stochastic_max_iters=c.stochastic_max_iters,
        take_one_less_inference_step=c.take_one_less_inference_step, JFB=c.grad_mode == "jfb",
        verbose_solver=False, **extra_args)
    atomic_torch_save({"args": args, "state_dict": model.state_dict()}, path)
