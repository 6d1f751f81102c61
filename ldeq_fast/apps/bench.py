"""``ldeq-fast bench``: time the model on every path; ``--accuracy``: accuracy per cell evaluation."""
from __future__ import annotations

import argparse

from ldeq_fast.apps.common import ints

NAME = "bench"
HELP = "time the default model on random images on every available path"


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--batch", type=ints, default=None, help="comma-separated batch sizes (CPU default 1,8; GPU 32,1)")
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
    g.add_argument("--evals", type=ints, default=None, help="cell evaluations to measure (default 1,2,3,4,5,7,11,21)")
    g.add_argument("--converged-iters", type=int, default=50, help="iterations of the converged answer (default 50)")
    g.add_argument("--within", type=float, default=1.0, help="recommend the cheapest setting whose NME is within this "
                   "%% of the converged NME (without labels: distance to converged <= this NME %%); default 1")
    g.add_argument("--accuracy-batch", type=int, default=64, help="batch size of the accuracy runs")
    g.add_argument("--png", default=None, help="write the plot here")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (--model random)")


def run(a) -> int:
    import torch

    from ldeq_fast.benchmark import format_table, run_bench, save_json

    if a.accuracy:
        return run_accuracy_report(a)

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
    from ldeq_fast.model import load_model

    init = None if a.init == "none" else ("auto" if a.init is None else a.init)
    return load_model(a.model, init=init), a.model, True


def run_accuracy_report(a) -> int:
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
    from ldeq_fast.machine import finish_record, machine_info

    machine = machine_info()   # before the measurement; finish_record adds the load after it
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
    res.update(machine=finish_record(machine), model=what, config=c.to_dict(),
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
