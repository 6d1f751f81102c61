"""The ``ldeq-fast`` command line."""
from __future__ import annotations

import argparse
import sys


def _ints(s: str):
    return tuple(int(v) for v in s.split(",") if v)


def cmd_bench(a) -> int:
    import torch

    from ldeq_fast.benchmark import format_table, run_bench, save_json

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = a.batch or ((32, 1) if device.startswith("cuda") else (1, 8))
    res = run_bench(batch_sizes=batches, repeats=a.repeats, max_iters=a.max_iters, small=a.small, device=device,
                    paths=a.paths.split(",") if a.paths else None, progress=not a.no_progress)
    print(format_table(res))
    if a.json:
        save_json(res, a.json)
        print(f"wrote {a.json}")
    return 1 if res["fast_path_problems"] else 0


def cmd_export(a) -> int:
    from ldeq_fast.export import export_onnx, verify_onnx

    if a.checkpoint and a.small:
        raise SystemExit("ldeq-fast export: --small builds a fresh model; it cannot be combined with --checkpoint")
    if a.checkpoint:
        from ldeq_fast.model.published import CheckpointError, load_published

        try:
            model = load_published(a.checkpoint, backend="torch")
        except CheckpointError as exc:
            raise SystemExit(f"ldeq-fast export: {exc}") from exc
    else:
        from ldeq_fast import LDEQ, LDEQConfig

        model = LDEQ(LDEQConfig.small(backend="torch") if a.small else LDEQConfig(backend="torch")).eval()
        print("no --checkpoint: exporting a randomly initialised model")
    try:
        meta = export_onnx(model, a.onnx, iters=a.iters, opset=a.opset, solver=a.solver, exporter=a.exporter)
    except ValueError as exc:
        raise SystemExit(f"ldeq-fast export: {exc}") from exc
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldeq-fast", description="Fast Landmark Deep Equilibrium models")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the default model on random images on every available path")
    b.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes (CPU default 1,8; GPU 32,1)")
    b.add_argument("--repeats", type=int, default=2, help="timed runs per path and batch (median reported)")
    b.add_argument("--max-iters", type=int, default=None, help="solver iterations (default: the config's 10)")
    b.add_argument("--small", action="store_true", help="a narrow 128x128 model instead of the published size")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--paths", default=None, help="comma-separated subset of paths (reference is always run)")
    b.add_argument("--json", default=None, help="also write the results as JSON to this file")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_bench)

    from ldeq_fast.train import add_train_arguments, cmd_train

    t = sub.add_parser("train", help="train LDEQ (synthetic faces by default, or WFLW); torchrun for DDP")
    add_train_arguments(t)
    t.set_defaults(fn=cmd_train)

    from ldeq_fast.video.cli import add_video_arguments, cmd_video

    v = sub.add_parser("video", help="per-frame vs filters vs RwR on synthetic hard videos or WFLW-V")
    add_video_arguments(v)
    v.set_defaults(fn=cmd_video)

    from ldeq_fast.landmarker_cli import add_predict_arguments, add_track_arguments, cmd_predict, cmd_track

    pr = sub.add_parser("predict", help="landmarks on photos: annotated images + one JSON/CSV")
    add_predict_arguments(pr)
    pr.set_defaults(fn=cmd_predict)
    tr = sub.add_parser("track", help="landmarks on videos (RwR, many videos as batch slots): annotated mp4, "
                        ".npz, .csv and a summary per video")
    add_track_arguments(tr)
    tr.set_defaults(fn=cmd_track)

    e = sub.add_parser("export", help="export to ONNX with a fixed number of fixed-point iterations unrolled")
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
    e.set_defaults(fn=cmd_export)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
