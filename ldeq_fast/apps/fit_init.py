"""``ldeq-fast fit-init``: fit a learned initial state for a model (no labels: its own fixed points)."""
from __future__ import annotations

import argparse
import sys

from ldeq_fast.apps.common import UsageError

NAME = "fit-init"
HELP = "fit a learned initial state for a model (no labels: its own fixed points)"


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(a) -> int:
    from ldeq_fast.accuracy import FIT_SEED
    from ldeq_fast.fit_init import FitConfig, fit_initial_state, load_image_folder, synthetic_images
    from ldeq_fast.model import load_model
    from ldeq_fast.model.init_state import init_path_for, save_initial_state
    from ldeq_fast.model.loading import model_path

    if (a.images is None) == (a.synthetic is None):
        raise UsageError("give exactly one of --images DIR or --synthetic N")
    if a.synthetic is not None and a.synthetic < 2:
        raise UsageError("--synthetic needs at least 2 faces")
    init = {k: v for k, v in (("width", a.width), ("levels", a.levels)) if v is not None}
    cfg = FitConfig(map_steps=a.map_steps, steps=a.steps, batch_size=a.batch_size, lr=a.lr, unroll=a.unroll,
                    converged_iters=a.converged_iters, select_evals=a.select_evals, seed=a.seed, init=init)
    model = load_model(a.model, init=None)
    if a.device:
        model = model.to(a.device)
    size = model.cfg.im_size
    if a.images is not None:
        images = load_image_folder(a.images, size, a.limit)
        data = {"images": str(a.images), "n": len(images)}
    else:
        seed = FIT_SEED if a.seed_data is None else a.seed_data
        images = synthetic_images(a.synthetic, size, seed, a.difficulty, progress=not a.no_progress)
        data = {"synthetic": a.synthetic, "seed": seed, "difficulty": a.difficulty}
    h, rep = fit_initial_state(model, images, cfg, progress=not a.no_progress)
    out = a.out or init_path_for(model_path(a.model))
    meta = {**rep, "data": data, "model": a.model, "command": "ldeq-fast " + " ".join(sys.argv[1:])}
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
