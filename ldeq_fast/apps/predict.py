"""``ldeq-fast predict``: landmarks on photos, as annotated images and one JSON / CSV."""
from __future__ import annotations

import argparse

from ldeq_fast.apps.common import UsageError, print_error
from ldeq_fast.apps.landmarking import add_common, landmarker, my_share, progress_bar

NAME = "predict"
HELP = "landmarks on photos: annotated images + one JSON/CSV"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    add_common(p)
    p.add_argument("--boxes", default=None, help="file of boxes per image (.json {name: box}, .csv name,x1,y1,x2,y2)")
    p.add_argument("--max-faces", type=int, default=1, help="faces per image (most prominent first)")
    p.add_argument("--no-images", action="store_true", help="write only the JSON/CSV, no annotated images")


def run(a) -> int:
    """Exit status 1 when no image had a face (each failure is reported), else 0."""
    from ldeq_fast.detect import GivenBoxes, load_boxes, parse_box
    from ldeq_fast.images import list_images
    from ldeq_fast.landmark_files import predict_to_folder

    if a.box and a.boxes:
        raise UsageError("give --box or --boxes, not both")
    files, names, rank, world, _ = my_share(list_images, a.images, "image")
    boxes = None
    if a.box:
        boxes = GivenBoxes(box=parse_box(a.box))
    elif a.boxes:
        boxes = GivenBoxes(per_item=load_boxes(a.boxes))
    lm = landmarker(a, max_faces=a.max_faces)
    suffix = "" if world == 1 else f".rank{rank}"
    bar = progress_bar(a, len(files), "image", rank)
    try:
        s = predict_to_folder(lm, files, names, a.out, boxes, write_images=not a.no_images,
                              draw_uncertainty=a.uncertainty, suffix=suffix,
                              progress=bar.update if bar is not None else None,
                              report=lambda file, error: print_error(NAME, error if str(file) in error
                                                                     else f"{file}: {error}"),
                              record={"rank": rank, "world_size": world})
    finally:
        if bar is not None:
            bar.close()
    print(f"{s['with_face']}/{s['images']} images with landmarks ({s['seconds']:.1f} s); wrote "
          f"{a.out}/landmarks{suffix}.json, .csv" + ("" if a.no_images else " and annotated images"))
    return 1 if s["images"] and not s["with_face"] else 0
