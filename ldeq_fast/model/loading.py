"""One loader for every way a model is named: ``'demo'`` (the shipped model), an ldeq_fast weights file
(``.pt`` with its ``.json`` beside it) or a published checkpoint.  Every command and
:class:`~ldeq_fast.landmarker.Landmarker` load through :func:`load_model`."""
from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo_synthetic.pt"


def model_path(spec: str) -> Path:
    """The file behind a model spec (the shipped demo model's for ``'demo'``)."""
    return DEMO_MODEL if spec == "demo" else Path(spec)


def load_model(spec, init="auto"):
    """'demo', an ldeq_fast ``.pt`` (+ ``.json``) or a published checkpoint, as an LDEQ in eval mode.

    ``init``: its learned initial state (default: ``<stem>.init.pt`` beside it when present; a path: that
    file; None: none).  A missing, corrupt or unsafe file raises
    :class:`~ldeq_fast.model.checkpoint.CheckpointError` naming it."""
    from ldeq_fast.model.published import load_published
    from ldeq_fast.model.weights import load_weights

    if str(spec) == "demo":
        if not DEMO_MODEL.is_file():
            raise FileNotFoundError(f"the shipped demo model is missing ({DEMO_MODEL}); reinstall ldeq_fast or "
                                    "train one: see docs/training.md")
        return load_weights(DEMO_MODEL, init=init)
    p = Path(spec)
    if p.suffix == ".pt" and p.with_suffix(".json").is_file():
        return load_weights(p, init=init)
    return load_published(p, init=init)
