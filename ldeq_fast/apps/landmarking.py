"""What ``ldeq-fast predict`` and ``ldeq-fast track`` share: their common options, the Landmarker they build,
and each rank's share of the files.

Under ``torchrun --nproc_per_node N -m ldeq_fast.cli track ...`` (or any launcher that sets RANK and
WORLD_SIZE) rank r takes the files r, r+N, ... and writes their outputs and its own summary; the ranks never
communicate.
"""
from __future__ import annotations

import argparse
import os

from ldeq_fast.apps.common import UsageError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (shipped, trained on synthetic faces), an ldeq_fast "
                   ".pt (with its .json) or a published checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--detector", default="haar", help="haar (OpenCV cascade, default), none, or a YuNet .onnx file")
    p.add_argument("--box", default=None, help="x1,y1,x2,y2: the face box (every image / the first frame)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--backend", default=None, help="solver backend (auto|torch|cpp|triton|cuda)")
    p.add_argument("--batch", type=int, default=8, help="images per forward (predict) / streams per step (track)")
    p.add_argument("--uncertainty", action="store_true", help="draw each landmark's uncertainty as a circle")
    p.add_argument("--no-progress", action="store_true")


def rank_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def my_share(lister, paths: list, what: str) -> tuple[list, list, int, int, int]:
    """(this rank's input files, their output names, rank, world size, number of files of all ranks); output names are computed on all the
    files, so every rank names a file alike."""
    from ldeq_fast.landmark_files import output_names

    rank, world = rank_world()
    files = lister(paths)
    if not files:
        raise FileNotFoundError(f"no {what} files found in " + " ".join(map(str, paths)))
    names = output_names(files)
    mine = range(rank, len(files), world)
    return [files[i] for i in mine], [names[i] for i in mine], rank, world, len(files)


def device(arg):
    if arg:
        return arg
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def landmarker(a, **extra):
    from ldeq_fast.landmarker import Landmarker

    return Landmarker(a.model, device=device(a.device), detector=a.detector, backend=a.backend,
                      batch_size=a.batch, **extra)


def progress_bar(a, total, unit, rank):
    """A tqdm bar on rank 0 unless --no-progress (None otherwise)."""
    if a.no_progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=f"ldeq-fast {a.command}", dynamic_ncols=True)
