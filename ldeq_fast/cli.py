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
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldeq-fast", description="Fast Landmark Deep Equilibrium models")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the default model on random images on every available path")
    b.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes (CPU default 1,8; GPU 32,1)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per path and batch (median reported)")
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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
