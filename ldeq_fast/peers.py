"""The alternatives a user compares ldeq_fast with, as runners the benchmarks time beside the fast path.

* ``onnxruntime`` and ``openvino``: the project's own ONNX export (ldeq_fast/export.py: ``iters`` fixed-point
  iterations unrolled, the extra step, the learned initial state when the model has one) run by each
  runtime on the CPU with the machine's threads (``torch.get_num_threads()``), in float32 (OpenVINO's
  precision hint is pinned to f32: on a CPU with AMX or AVX-512 bf16 it would otherwise compute in bf16,
  another computation).
* ``compile``: ``torch.compile`` of the reference model (plain PyTorch ops, its own solver); its first call
  (the compilation) is timed separately.

A peer whose package is not installed is not an error: ``missing_reason`` says why it cannot run, and the
benchmarks record it under 'skipped'.
"""
from __future__ import annotations

import importlib
import os
import time

import torch

ONNX_PEERS = ("onnxruntime", "openvino")
PEERS = ONNX_PEERS + ("compile",)
# the unrolled-graph peer a default ``ldeq-fast bench`` runs: the first installed of these (a fixed order, not
# measured per run: a second peer would cost the default run another minute; the all-peers run,
# bench/results/model_cpu_peers.json, times both)
DEFAULT_PEER_ORDER = ("openvino", "onnxruntime")
ONNX_EXPORTER = "torchscript"   # the same graph as the dynamo exporter, exported an order of magnitude faster
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "compile": "torch"}
INSTALL = "pip install 'ldeq_fast[peers]' (or bash scripts/setup.sh)"


def _module(name: str):
    return importlib.import_module(_MODULES[name])


def missing_reason(name: str) -> str | None:
    """Why peer ``name`` cannot run here (None: it can)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; peers: {list(PEERS)}")
    try:
        mod = _module(name)
    except ImportError as exc:
        return f"{_MODULES[name]} is not installed ({exc}); {INSTALL}"
    if name in ONNX_PEERS:
        try:
            importlib.import_module("onnx")
        except ImportError as exc:
            return f"onnx (needed to export the model) is not installed ({exc}); {INSTALL}"
    if name == "compile" and not hasattr(mod, "compile"):
        return f"torch {mod.__version__} has no torch.compile"
    return None


def peer_version(name: str) -> str:
    """The installed version (OpenVINO's build suffix dropped: '2026.4.1-22982-e213...' -> '2026.4.1')."""
    v = str(_module(name).__version__)
    return v.split("-")[0] if name == "openvino" else v


def export_for_peers(model, path, iters: int) -> dict:
    """Export ``model`` with ``iters`` fixed-point iterations unrolled (+ its extra step, from its learned
    initial state when attached); the metadata written and the export's wall time (``export_s``)."""
    import warnings

    from ldeq_fast.export import export_onnx

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the tracer's notes on shape checks it records as constants (input checks, not the graph's maths)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        meta = export_onnx(model, path, iters=iters, solver="fpi", exporter=ONNX_EXPORTER)
    return {**meta, "export_s": time.perf_counter() - t0}


class OnnxPeer:
    """One runtime running an exported file: ``peer(images) -> keypoints`` (B, K, 2) as a torch tensor."""

    def __init__(self, name: str, onnx_path, threads: int | None = None):
        if name not in ONNX_PEERS:
            raise ValueError(f"{name!r} is not an ONNX runtime peer; those are {list(ONNX_PEERS)}")
        why = missing_reason(name)
        if why:
            raise ImportError(why)
        self.name = name
        self.threads = int(threads or torch.get_num_threads())
        self.version = peer_version(name)
        path = os.fspath(onnx_path)
        t0 = time.perf_counter()
        if name == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # no spin-waiting after a run: in an interleaved bench the spinning pool would take the cores of the
            # path timed next (a run's own speed is unchanged: its threads are busy with convolutions)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self.settings = {"providers": self._session.get_providers(), "intra_op_num_threads": self.threads,
                             "graph_optimization_level": "ORT_ENABLE_ALL",
                             "allow_spinning": "0"}
            self._run = lambda x: self._session.run(["keypoints"], {"images": x})[0]
        else:
            import openvino as ov

            core = ov.Core()
            config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32",
                      "PERFORMANCE_HINT": "LATENCY"}
            self._compiled = core.compile_model(path, "CPU", config)
            out = self._compiled.output("keypoints")
            self.settings = {"device": "CPU", **{k: str(v) for k, v in config.items()},
                             "precision_ran": str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))}
            self._run = lambda x: self._compiled({"images": x})[out]
        self.load_s = time.perf_counter() - t0   # session creation / graph compilation

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(images.float().cpu().contiguous().numpy()).copy())

    def info(self) -> dict:
        return {"version": self.version, "threads": self.threads, "load_s": self.load_s, "settings": self.settings}


def compile_reference(model):
    """``torch.compile`` of a reference (backend 'torch') model, default mode and backend (inductor)."""
    if model.cfg.backend != "torch":
        raise ValueError("compile_reference compiles the reference model (backend 'torch'), got backend "
                         f"{model.cfg.backend!r}")
    return torch.compile(model)
