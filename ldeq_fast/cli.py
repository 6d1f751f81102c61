"""The ``ldeq-fast`` command line."""
from __future__ import annotations

import argparse
import sys


def _ints(s: str):
    return tuple(int(v) for v in s.split(",") if v)


def cmd_bench(a) -> int:
    import torch

    from ldeq_fast.benchmark import format_table, run_bench, save_json

    if a.accuracy:
        return cmd_bench_accuracy(a)

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = a.batch or ((32, 1) if device.startswith("cuda") else (1, 8))
    res = run_bench(batch_sizes=batches, repeats=a.repeats, max_iters=a.max_iters, small=a.small, device=device,
                    paths=a.paths.split(",") if a.paths else None, progress=not a.no_progress)
    print(format_table(res))
    if a.json:
        save_json(res, a.json)
        print(f"wrote {a.json}")
    return 1 if res["fast_path_problems"] else 0


def _accuracy_model(a):
    """(model, description, labels usable) for ``bench --accuracy``."""
    import torch

    if a.model == "random":
        from ldeq_fast import LDEQ, LDEQConfig

        torch.manual_seed(a.seed)
        model = LDEQ(LDEQConfig()).eval()
        if a.init not in (None, "none"):
            from ldeq_fast.model.init_state import attach_initial_state

            attach_initial_state(model, a.init, a.init)
        return model, "published-size model, random weights", False
    from ldeq_fast.video.cli import load_model

    init = None if a.init == "none" else ("auto" if a.init is None else a.init)
    return load_model(a.model, init=init), a.model, True


def cmd_bench_accuracy(a) -> int:
    import torch

    from ldeq_fast.accuracy import (
        EVALS,
        HELD_OUT_SEED,
        format_accuracy,
        plot_accuracy,
        recommend,
        run_accuracy,
        time_to_accuracy,
    )
    from ldeq_fast.benchmark import save_json
    from ldeq_fast.fit_init import synthetic_images
    from ldeq_fast.machine import machine_info

    model, what, labelled = _accuracy_model(a)
    if a.device:
        model = model.to(a.device)
    c = model.cfg
    seed = HELD_OUT_SEED if a.stills_seed is None else a.stills_seed
    n = a.stills if a.stills is not None else (256 if labelled else 4)   # a published-size solve is ~100x dearer
    from ldeq_fast.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(n, size=c.im_size, seed=seed, difficulty=a.difficulty)
    images = synthetic_images(n, c.im_size, seed, a.difficulty, progress=not a.no_progress)
    labels = torch.stack([faces[i]["kpts"] for i in range(n)]) if labelled else None
    res = run_accuracy(model, images, labels, evals=a.evals or EVALS, converged_iters=a.converged_iters,
                       batch=a.accuracy_batch, progress=not a.no_progress)
    res["recommendation"] = recommend(res, a.within)
    if a.paths != "none":   # the paths and peers timed to the same accuracy (ldeq_fast.accuracy.time_to_accuracy)
        res["time_to_accuracy"] = time_to_accuracy(model, images, labels, res, a.within, a.paths and a.paths.split(","),
                                                   progress=not a.no_progress)
    res.update(machine=machine_info(), model=what, config=c.to_dict(),
               stills={"n": n, "seed": seed, "difficulty": a.difficulty, "size": c.im_size},
               initial_state=getattr(model, "initial_state_info", None))
    print(format_accuracy(res))
    if "time_to_accuracy" in res:
        from ldeq_fast.accuracy import format_time_to_accuracy

        print(format_time_to_accuracy(res["time_to_accuracy"]))
    if a.json:
        save_json(res, a.json)
        print(f"wrote {a.json}")
    if a.png:
        plot_accuracy(res, a.png, f"{what}: {n} held-out {a.difficulty} synthetic stills")
        print(f"wrote {a.png}")
    return 0


def cmd_fit_init(a) -> int:
    import sys as _sys

    from ldeq_fast.accuracy import FIT_SEED
    from ldeq_fast.fit_init import FitConfig, fit_initial_state, load_image_folder, synthetic_images
    from ldeq_fast.model.init_state import init_path_for, save_initial_state
    from ldeq_fast.video.cli import load_model, model_path

    if (a.images is None) == (a.synthetic is None):
        raise SystemExit("ldeq-fast fit-init: give exactly one of --images DIR or --synthetic N")
    model = load_model(a.model, init=None)
    if a.device:
        model = model.to(a.device)
    size = model.cfg.im_size
    if a.images is not None:
        try:
            images = load_image_folder(a.images, size, a.limit)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"ldeq-fast fit-init: {exc}") from exc
        data = {"images": str(a.images), "n": len(images)}
    else:
        if a.synthetic < 2:
            raise SystemExit("ldeq-fast fit-init: --synthetic needs at least 2 faces")
        seed = FIT_SEED if a.seed_data is None else a.seed_data
        images = synthetic_images(a.synthetic, size, seed, a.difficulty, progress=not a.no_progress)
        data = {"synthetic": a.synthetic, "seed": seed, "difficulty": a.difficulty}
    init = {k: v for k, v in (("width", a.width), ("levels", a.levels)) if v is not None}
    try:
        cfg = FitConfig(map_steps=a.map_steps, steps=a.steps, batch_size=a.batch_size, lr=a.lr, unroll=a.unroll,
                        converged_iters=a.converged_iters, select_evals=a.select_evals, seed=a.seed, init=init)
    except ValueError as exc:
        raise SystemExit(f"ldeq-fast fit-init: {exc}") from exc
    h, rep = fit_initial_state(model, images, cfg, progress=not a.no_progress)
    out = a.out or init_path_for(model_path(a.model))
    meta = {**rep, "data": data, "model": a.model, "command": "ldeq-fast " + " ".join(_sys.argv[1:])}
    save_initial_state(h, out, model, meta)
    v, z = rep["val_vs_converged"], rep["val_vs_converged_from_zeros"]
    print(f"initial state: {rep['cost']['init_flops'] / 1e6:.2f} MFLOP per image = {rep['cost']['ratio']:.3f} cell "
          f"evaluations; fitted on {rep['train_images']} images, validated on {rep['val_images']}")
    print("held-out distance to the converged answer (NME %), learned init vs zeros: "
          + "; ".join(f"{e} evaluations {100 * v[e]:.3f} vs {100 * z[e]:.3f}" for e in v))
    print(f"wrote {out}")
    if a.json:
        from ldeq_fast.benchmark import save_json

        save_json(meta, a.json)
    return 0


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


def add_accuracy_arguments(b: argparse.ArgumentParser) -> None:
    g = b.add_argument_group("accuracy per cell evaluation (--accuracy)")
    g.add_argument("--accuracy", action="store_true", help="error against the converged answer vs cell evaluations "
                   "for fpi and Anderson, from zeros and from the learned initial state, on held-out synthetic stills")
    g.add_argument("--model", default="demo", help="'demo', an ldeq_fast .pt, a published checkpoint, or 'random' "
                   "(published size, random weights: error vs its converged solution only)")
    g.add_argument("--init", default=None, help="initial-state file (default: <model stem>.init.pt if present; "
                   "'none': no learned init)")
    g.add_argument("--stills", type=int, default=None, help="held-out hard synthetic stills (default 256; 4 for "
                   "--model random)")
    g.add_argument("--stills-seed", type=int, default=None, help="their seed (default: the held-out seed)")
    g.add_argument("--difficulty", default="hard", choices=("normal", "hard"))
    g.add_argument("--evals", type=_ints, default=None, help="cell evaluations to measure (default 1,2,3,4,5,7,11,21)")
    g.add_argument("--converged-iters", type=int, default=50, help="iterations of the converged answer (default 50)")
    g.add_argument("--within", type=float, default=1.0, help="recommend the cheapest setting whose NME is within this "
                   "%% of the converged NME (without labels: distance to converged <= this NME %%); default 1")
    g.add_argument("--accuracy-batch", type=int, default=64, help="batch size of the accuracy runs")
    g.add_argument("--png", default=None, help="write the plot here")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (--model random)")


def add_fit_init_arguments(p: argparse.ArgumentParser) -> None:
    from ldeq_fast.fit_init import FitConfig

    d = FitConfig()
    p.add_argument("--model", required=True, help="'demo', an ldeq_fast .pt (with its .json) or a published checkpoint")
    p.add_argument("--images", default=None, help="a folder of face crops (any size; centre square, resized)")
    p.add_argument("--synthetic", type=int, default=None, help="fit on this many synthetic faces instead")
    p.add_argument("--difficulty", default="hard", choices=("normal", "hard"), help="synthetic faces' difficulty")
    p.add_argument("--seed-data", type=int, default=None, help="synthetic faces' seed (default: fit-init's own)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images from --images")
    p.add_argument("--out", default=None, help="output file (default: <model stem>.init.pt beside the model)")
    p.add_argument("--map-steps", type=int, default=d.map_steps, help="stage 1: steps fitting h's own maps (cheap)")
    p.add_argument("--steps", type=int, default=d.steps, help="stage 2: steps through the unrolled cell")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--unroll", type=int, default=d.unroll, help="cell evaluations from h(x) the loss looks through")
    p.add_argument("--converged-iters", type=int, default=d.converged_iters, help="solver iterations of the targets")
    p.add_argument("--select-evals", type=int, default=d.select_evals, help="pick the checkpoint best at this many evaluations")
    p.add_argument("--width", type=int, default=None, help="initial state's channels (default: by model size)")
    p.add_argument("--levels", type=int, default=None, help="its hourglass depth (default: down to 2x2)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the fit report as JSON here")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldeq-fast", description="Fast Landmark Deep Equilibrium models")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the default model on random images on every available path")
    b.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes (CPU default 1,8; GPU 32,1)")
    b.add_argument("--repeats", type=int, default=2, help="timed runs per path and batch (median reported)")
    b.add_argument("--max-iters", type=int, default=None, help="solver iterations (default: the config's 10)")
    b.add_argument("--small", action="store_true", help="a narrow 128x128 model instead of the published size")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--paths", default=None, help="comma-separated paths: reference (always run), fast, published, "
                   "onnxruntime, openvino (the ONNX export; fast then also runs its fpi computation), compile "
                   "(torch.compile of the reference; compiles for minutes) (default: reference,fast,published and "
                   "the first installed of openvino, onnxruntime); with --accuracy: the paths timed to equal "
                   "accuracy (default: reference,published,fast,onnxruntime,openvino; 'none': no timing)")
    b.add_argument("--json", default=None, help="also write the results as JSON to this file")
    b.add_argument("--no-progress", action="store_true")
    add_accuracy_arguments(b)
    b.set_defaults(fn=cmd_bench)

    fi = sub.add_parser("fit-init", help="fit a learned initial state for a model (no labels: its own fixed points)")
    add_fit_init_arguments(fi)
    fi.set_defaults(fn=cmd_fit_init)

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
