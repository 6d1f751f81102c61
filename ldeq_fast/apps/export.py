"""``ldeq-fast export``: ONNX with a fixed number of fixed-point iterations unrolled, checked by onnxruntime."""
from __future__ import annotations

import argparse

from ldeq_fast.apps.common import UsageError

NAME = "export"
HELP = "export to ONNX with a fixed number of fixed-point iterations unrolled"


def add_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--onnx", required=True, help="output .onnx file")
    e.add_argument("--checkpoint", default=None, help="published-format checkpoint (default: random weights)")
    e.add_argument("--iters", type=int, default=None, help="unrolled iterations (default: the config's max_iters)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    e.add_argument("--small", action="store_true", help="a narrow 128x128 model (without --checkpoint)")
    e.add_argument("--solver", choices=["fpi"], default=None,
                   help="export fixed-point iterations for a model configured with Anderson (required then)")
    e.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.onnx exporter (torchscript: the legacy one, much faster to export)")
    e.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")


def run(a) -> int:
    from ldeq_fast.export import export_onnx, verify_onnx

    if a.checkpoint and a.small:
        raise UsageError("--small builds a fresh model; it cannot be combined with --checkpoint")
    if a.checkpoint:
        from ldeq_fast.model.published import load_published

        model = load_published(a.checkpoint, backend="torch")
    else:
        from ldeq_fast import LDEQ, LDEQConfig

        model = LDEQ(LDEQConfig.small(backend="torch") if a.small else LDEQConfig(backend="torch")).eval()
        print("no --checkpoint: exporting a randomly initialised model")
    meta = export_onnx(model, a.onnx, iters=a.iters, opset=a.opset, solver=a.solver, exporter=a.exporter)
    print(f"wrote {a.onnx}: " + ", ".join(f"{k}={meta[k]}" for k in ("iterations", "extra_step", "solver", "opset",
                                                                     "input_size", "n_keypoints")))
    if not a.no_verify:
        try:
            report = verify_onnx(model, a.onnx)
        except ImportError as exc:
            print(f"not verified: {exc} (pip install onnxruntime)")
        else:
            print("onnxruntime vs PyTorch, max abs difference: " + ", ".join(f"{k}={v}" for k, v in report.items()))
            if report["keypoints_vs_unrolled"] > 1e-4:
                print("note: kernel rounding differences grow with every iteration of a map that is not a "
                      "contraction (as with random weights); the unrolled graph itself is the same")
            if not report.get("solver_best_is_last", True):
                print("note: the residual rose at some iteration, so the solver returned an earlier iterate's "
                      "image than the unrolled graph (keypoints_vs_solver is not like for like)")
    return 0
