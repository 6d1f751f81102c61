"""ONNX export of an LDEQ with a fixed number of fixed-point iterations unrolled.

The exported graph maps ImageNet-normalised images (B, 3, S, S) to ``keypoints`` (B, K, 2; (x, y) divided
by the heatmap size) and ``uncertainty`` (B, K): stem -> z0 (the model's learned initial state when it has one,
ldeq_fast/model/init_state.py; zeros otherwise) -> ``iters`` cell evaluations -> the model's
extra inference step (implicit models without ``take_one_less_inference_step``) -> heatmap read-out.  That is
exactly what ``model(x, solver=SolverSettings(method='fpi', max_iter=iters, tol=0.0, backend='torch'))``
computes when the residual keeps falling (the per-sample solver returns the image of its best iterate).

Anderson acceleration is not exported: each step solves a small bordered linear system per sample, and ONNX
has no linear-solve operator (an unrolled elimination would have to pivot around the zero corner of the
bordered matrix).  A model configured with solver='anderson' is exported only when ``solver='fpi'`` is asked
for explicitly; fixed-point iteration needs more iterations than Anderson for the same accuracy.
"""
from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn

DEFAULT_OPSET = 18
UNCERTAINTY = ("spread", "published")


class UnrolledLDEQ(nn.Module):
    """The exported computation, composed of the model's stages: ``injection`` -> ``initial_z0`` (the learned
    initial state when one is attached: an export is for inference; zeros otherwise) -> ``iters`` cell
    evaluations (+ the extra step) unrolled -> ``read_out``."""

    def __init__(self, model: nn.Module, iters: int, extra_step: bool, uncertainty: str = "spread"):
        super().__init__()
        self.model = model
        # the learned initial state is attached to the model, not registered in it: registered here, so its
        # weights are the exported graph's parameters rather than constants
        self.initial_state = getattr(model, "initial_state", None)
        self.steps = iters + int(extra_step)
        self.published_uncertainty = uncertainty == "published"

    def forward(self, images: torch.Tensor):
        m = self.model
        z, _ = m.solve(m.injection(images), mode="explicit", max_iters=self.steps)
        out = m.read_out(z)
        return out.keypoints, out.uncertainty_published if self.published_uncertainty else out.uncertainty


def export_plan(model, iters: int | None = None, solver: str | None = None) -> dict:
    """Iteration count, extra step and solver label of an export, or a clear error for what cannot be exported."""
    c = model.cfg
    if c.model_mode == "explicit":
        # an explicit model is its unrolled depth: no solver, no extra step
        return {"iters": int(c.explicit_depth if iters is None else iters), "extra_step": False, "solver": "fpi",
                "model_mode": "explicit"}
    if solver not in (None, "fpi"):
        raise ValueError(f"solver={solver!r} cannot be exported to ONNX: only unrolled fixed-point iterations "
                         "('fpi') are (Anderson's per-step linear solve has no ONNX operator)")
    if c.solver != "fpi" and solver is None:
        raise ValueError(f"this model solves with {c.solver!r}, which cannot be exported to ONNX; pass solver='fpi' "
                         "(CLI: --solver fpi) to export unrolled fixed-point iterations instead (they need more "
                         "iterations than Anderson for the same accuracy: choose --iters accordingly)")
    n = int(c.max_iters if iters is None else iters)
    return {"iters": n, "extra_step": not c.take_one_less_inference_step, "solver": "fpi", "model_mode": "implicit"}


def _check(model, iters: int, opset: int, batch: int, uncertainty: str, exporter: str) -> None:
    if not all(hasattr(model, a) for a in ("tail", "deq_layer", "cfg")):
        raise TypeError(f"export_onnx needs an ldeq_fast LDEQ model, got {type(model).__name__}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if opset < 17:  # GroupNormalization's opset; the dynamo exporter itself needs >= 18
        raise ValueError(f"opset must be >= 17, got {opset}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if uncertainty not in UNCERTAINTY:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY}, not {uncertainty!r}")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', not {exporter!r}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise TypeError(f"export a float32 model (model.float()); its parameters are {sorted(map(str, dtypes))}")


def _metadata(model, plan: dict, opset: int, batch: int, dynamic_batch: bool, uncertainty: str,
              exporter: str) -> dict:
    from ldeq_fast import __version__

    c = model.cfg
    learned = getattr(model, "initial_state", None) is not None
    return {"ldeq_fast_version": __version__, "opset": str(opset), "iterations": str(plan["iters"]),
            "extra_step": str(int(plan["extra_step"])), "solver": plan["solver"], "model_mode": plan["model_mode"],
            "z0": "learned initial state" if learned else "zeros", "input_size": str(c.im_size), "heatmap_size": str(c.heatmap_size),
            "n_keypoints": str(c.n_keypoints), "batch": "dynamic" if dynamic_batch else str(batch),
            "input": f"images (B, 3, {c.im_size}, {c.im_size}) float32, ImageNet-normalised RGB",
            "keypoints": "(B, K, 2) (x, y) / heatmap_size, in [0, 1)",
            "uncertainty": "published formula" if uncertainty == "published" else "RMS heatmap spread / heatmap_size",
            "exporter": exporter}


def export_onnx(model, path, iters: int | None = None, opset: int = DEFAULT_OPSET, batch: int = 1,
                solver: str | None = None, dynamic_batch: bool = True, uncertainty: str = "spread",
                exporter: str = "dynamo") -> dict:
    """Write ``model`` to ``path`` as ONNX with ``iters`` fixed-point iterations unrolled (default: the
    config's max_iters; explicit models: their depth).  Returns the metadata written into the file.

    ``batch`` is the exported batch size when ``dynamic_batch`` is False; ``solver='fpi'`` is required for
    a model configured with Anderson (see the module docstring); ``uncertainty``: 'spread' (the RMS spread,
    LDEQOutput.uncertainty) or 'published' (the published formula); ``exporter``: 'dynamo' (torch.export
    based) or 'torchscript' (the legacy exporter: the same graph, exported an order of magnitude faster).
    """
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'ldeq_fast[export]'") from exc

    plan = export_plan(model, iters, solver)
    _check(model, plan["iters"], opset, batch, uncertainty, exporter)
    path = os.fspath(path)
    c = model.cfg
    # the fused ops are not ONNX operators: export a copy that runs the plain PyTorch ops (NCHW weights)
    model = copy.deepcopy(model)
    model.cfg = c.replace(backend="torch")
    model.apply_config()
    wrapper = UnrolledLDEQ(model, plan["iters"], plan["extra_step"], uncertainty).eval()
    # size-1 dims are specialised when tracing, so a dynamic batch is traced with two images
    example = torch.randn(max(batch, 2) if dynamic_batch else batch, 3, c.im_size, c.im_size,
                          device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
            names = dict(input_names=["images"], output_names=["keypoints", "uncertainty"], opset_version=opset)
            if exporter == "dynamo":
                shapes = {"images": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
                torch.onnx.export(wrapper, (example,), path, dynamo=True, dynamic_shapes=shapes, external_data=False,
                                  verbose=False, **names)
            else:
                axes = {"images": {0: "batch"}, "keypoints": {0: "batch"}, "uncertainty": {0: "batch"}}
                torch.onnx.export(wrapper, (example,), path, dynamo=False, dynamic_axes=axes if dynamic_batch else None,
                                  **names)
    finally:
        model.train(was_training)
    meta = _metadata(model, plan, opset, batch, dynamic_batch, uncertainty, exporter)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **meta})
    onnx.save(proto, path)
    return meta


def read_metadata(path) -> dict:
    """The metadata props of an ONNX file written by export_onnx."""
    import onnx

    return {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}


def verify_onnx(model, path, images: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Run the exported file in onnxruntime (CPU) and compare with PyTorch on the same images.

    Returns max abs differences against the unrolled PyTorch graph (``*_vs_unrolled``: the export itself)
    and, for implicit models, against the model's own solver running the same fixed iterations
    (``keypoints_vs_solver``: ``model(x, solver=SolverSettings(method='fpi', max_iter=iters, tol=0))``),
    which agrees only when ``solver_best_is_last`` (the residual fell at every iteration).
    """
    import onnxruntime as ort

    from ldeq_fast.deq import SolverSettings
    from ldeq_fast.model.ldeq import LDEQ

    meta = read_metadata(path)
    iters, extra = int(meta["iterations"]), bool(int(meta["extra_step"]))
    c = model.cfg
    if images is None:
        images = torch.randn(2, 3, c.im_size, c.im_size, generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    kpts, unc = session.run(None, {"images": images.float().cpu().numpy()})
    kpts, unc = torch.from_numpy(kpts), torch.from_numpy(unc)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            images = images.to(next(model.parameters()).device)
            wrapper = UnrolledLDEQ(model, iters, extra, "published" if meta["uncertainty"] == "published formula"
                                   else "spread")
            k_ref, u_ref = (t.cpu() for t in wrapper(images))
            report = {"iterations": iters, "keypoints_vs_unrolled": float((kpts - k_ref).abs().max()),
                      "uncertainty_vs_unrolled": float((unc - u_ref).abs().max())}
            if meta["model_mode"] == "implicit":
                settings = SolverSettings(method="fpi", max_iter=iters, tol=0.0, backend="torch")
                out = LDEQ.forward(model, images, solver=settings)  # ldeq_fast's forward, also for compat models
                report["keypoints_vs_solver"] = float((kpts - out.keypoints.cpu()).abs().max())
                # the solver returns the image of its best iterate: the same as the unrolled graph only when
                # the residual kept falling to the last iteration
                trace = out.stats.trace
                report["solver_best_is_last"] = bool((trace[-1] <= trace.amin(dim=0)).all())
    finally:
        model.train(was_training)
    return report
