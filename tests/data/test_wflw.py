from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_transforms import blob_image, centroid  # tests/ is on sys.path (no package)

from ldeq_fast.data.augment import AugmentConfig
from ldeq_fast.data.transforms import affine_from_points, apply_affine, denormalize, normalize_image, pad_crop
from ldeq_fast.data.wflw import ATTRIBUTES, AnnotationError, WFLWCropped, WFLWOriginal

S = 64   # tiny crops keep the tests fast; the readers take the size as a parameter


def write_rgb(path: Path, rgb: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def fmt(values) -> str:
    return " ".join(f"{v:.6f}" for v in np.asarray(values).ravel())


# --- pre-cropped layout ----------------------------------------------------------------------------


@pytest.fixture
def cropped(tmp_path):
    rng = np.random.default_rng(0)
    kpts = rng.uniform(0.1, 0.9, size=(3, 98, 2))
    kpts[2, 5] = (-0.25, 0.5)                 # overflows the left edge by 16 px: padded on loading
    lines = []
    for i in range(3):
        rel = f"sub/{i}.png"
        write_rgb(tmp_path / "test" / rel, rng.integers(0, 256, size=(S, S, 3), dtype=np.uint8))
        lines.append(f"{rel} {fmt(kpts[i])}")
    (tmp_path / "test.txt").write_text("\n".join(lines) + "\n\n")   # a trailing blank line is fine
    return tmp_path, kpts


def test_cropped_items_match_the_published_loading(cropped):
    root, kpts = cropped
    ds = WFLWCropped(root, "test", image_size=S)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert set(item) == {"image", "kpts", "path"}
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert item["kpts"].shape == (98, 2) and item["kpts"].dtype == torch.float32
        assert item["path"] == str(root / "test" / f"sub/{i}.png")
        rgb = cv2.cvtColor(cv2.imread(item["path"]), cv2.COLOR_BGR2RGB)
        img, k = pad_crop(rgb, kpts[i].astype(np.float32))
        torch.testing.assert_close(item["image"], normalize_image(img), rtol=0, atol=0)
        torch.testing.assert_close(item["kpts"], torch.from_numpy(k), rtol=1e-6, atol=1e-6)
        assert (item["kpts"] >= 0).all() and (item["kpts"] <= 1).all()
    # items without overflow are the stored image and coordinates; the overflowing one was padded
    np.testing.assert_allclose(ds[0]["kpts"].numpy(), kpts[0], atol=1e-6)
    assert not np.allclose(ds[2]["kpts"].numpy(), np.clip(kpts[2], 0, 1), atol=1e-3)
    assert (denormalize(ds[2]["image"])[:, :8] == 0).all()      # zero border on the left


def test_cropped_default_size_and_dataloader(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        write_rgb(tmp_path / "test_blur" / f"{i}.png", rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8))
    (tmp_path / "test_blur.txt").write_text("".join(f"{i}.png {fmt(rng.uniform(0, 1, 196))}\n" for i in range(2)))
    ds = WFLWCropped(tmp_path, "test_blur")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 256, 256) and batch["kpts"].shape == (2, 98, 2)
    assert len(batch["path"]) == 2


def test_cropped_augmentation_is_seeded(cropped):
    root, _ = cropped
    cfg = AugmentConfig(flip_prob=0.5, rotate_prob=1.0, scale_prob=1.0, translate_prob=1.0)
    a = WFLWCropped(root, "test", augment=cfg, seed=3, image_size=S)
    b = WFLWCropped(root, "test", augment=cfg, seed=3, image_size=S)
    plain = WFLWCropped(root, "test", image_size=S)
    x, y = a[1], b[1]
    torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)
    torch.testing.assert_close(x["kpts"], y["kpts"], rtol=0, atol=0)
    assert not torch.allclose(x["kpts"], plain[1]["kpts"])
    assert (x["kpts"] >= 0).all() and (x["kpts"] <= 1).all()
    a.set_epoch(1)
    assert not torch.allclose(a[1]["kpts"], x["kpts"])
    with pytest.raises(TypeError, match="AugmentConfig"):
        WFLWCropped(root, "test", augment={"flip_prob": 0.5}, image_size=S)


def write_cropped_list(tmp_path, lines):
    (tmp_path / "test.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("bad_line, msg", [
    ("a.png " + fmt(np.zeros(195)), "expected 197 tokens .*got 196"),
    ("a.png " + fmt(np.zeros(196)) + " 0.5", "expected 197 tokens .*got 198"),
    ("a.png " + fmt(np.zeros(100)) + " x0.3 " + fmt(np.zeros(95)), "token 102 is not a number: 'x0.3'"),
    ("a.png " + fmt(np.zeros(10)) + " nan " + fmt(np.zeros(185)), "token 12 is not finite"),
])
def test_cropped_bad_lines_name_file_and_line(tmp_path, bad_line, msg):
    good = "a.png " + fmt(np.full(196, 0.5))
    write_cropped_list(tmp_path, [good, "", bad_line, good])      # bad line is line 3
    with pytest.raises(AnnotationError, match=f"test.txt:3: {msg}"):
        WFLWCropped(tmp_path, "test", image_size=S)


def test_cropped_missing_files_and_wrong_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test_makeup\.txt"):
        WFLWCropped(tmp_path, "test_makeup")
    write_cropped_list(tmp_path, ["gone.png " + fmt(np.full(196, 0.5)), "big.png " + fmt(np.full(196, 0.5))])
    write_rgb(tmp_path / "test" / "big.png", np.zeros((S + 1, S, 3), np.uint8))
    # a missing image is reported when the dataset is built, not when an epoch reaches it
    with pytest.raises(FileNotFoundError, match=r"^1 of the 2 image files listed in .*test\.txt are missing: "
                                                r"\S*test/gone\.png$"):
        WFLWCropped(tmp_path, "test", image_size=S)
    (tmp_path / "test" / "gone.png").write_bytes(b"not an image")
    ds = WFLWCropped(tmp_path, "test", image_size=S)
    with pytest.raises(ValueError, match=rf"big\.png is {S}x{S + 1} \(WxH\); expected {S}x{S}"):
        ds[1]
    with pytest.raises(OSError, match=r"could not decode .*gone\.png"):
        ds[0]
    (tmp_path / "test.txt").write_text("\n\n")
    with pytest.raises(AnnotationError, match="no annotation lines"):
        WFLWCropped(tmp_path, "test", image_size=S)


# --- original annotation lists ---------------------------------------------------------------------


@pytest.fixture
def original(tmp_path):
    rng = np.random.default_rng(2)
    ann = tmp_path / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / "list_98pt_rect_attr_test.txt"
    ann.parent.mkdir(parents=True)
    lines, lms = [], []
    flags = [[0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1]]
    for i in range(3):
        h, w = 90 + 7 * i, 121
        lm = rng.uniform([30, 25], [90, 70], size=(98, 2))
        box = np.concatenate([lm.min(0) - 3, lm.max(0) + 2])
        write_rgb(tmp_path / "WFLW_images" / "0--Parade" / f"{i}.png", blob_image(h, w, lm[:1]))
        lines.append(f"{fmt(lm)} {fmt(box)} {' '.join(map(str, flags[i]))} 0--Parade/{i}.png")
        lms.append((lm, box))
    ann.write_text("\n".join(lines) + "\n")
    return tmp_path, lms, np.array(flags), ann


def test_original_crops_on_the_fly(original):
    root, lms, flags, _ = original
    ds = WFLWOriginal(root, "test", size=S)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert set(item) == {"image", "kpts", "path", "attributes"}
        assert item["image"].shape == (3, S, S)
        torch.testing.assert_close(item["attributes"], torch.from_numpy(flags[i]))
        lm, box = lms[i]
        A = affine_from_points(lm, box, 1.2, S)
        expect = apply_affine(lm, A) / S
        torch.testing.assert_close(item["kpts"], torch.from_numpy(expect).float(), rtol=1e-6, atol=1e-6)
        assert (item["kpts"] > 0.05).all() and (item["kpts"] < 0.95).all()
        # the blob drawn at landmark 0 of the original image sits at landmark 0 of the crop
        crop = denormalize(item["image"])
        k0 = item["kpts"][0].numpy() * S
        np.testing.assert_allclose(centroid(crop, k0, 4), k0, atol=0.35)
    assert ATTRIBUTES == ("pose", "expression", "illumination", "makeup", "occlusion", "blur")


def test_original_subsets(original):
    root, _, _, _ = original
    blur = WFLWOriginal(root, "test_blur", size=S)
    assert blur.relpaths == ["0--Parade/0.png", "0--Parade/2.png"] and blur.line_numbers == [1, 3]
    assert WFLWOriginal(root, "test", subset="blur", size=S).relpaths == blur.relpaths
    assert WFLWOriginal(root, "test_largepose", size=S).relpaths == ["0--Parade/1.png"]
    assert WFLWOriginal(root, "test", subset="pose", size=S).relpaths == ["0--Parade/1.png"]
    assert len(WFLWOriginal(root, "test_makeup", size=S)) == 0
    with pytest.raises(ValueError, match="unknown WFLW subset 'glasses'"):
        WFLWOriginal(root, "test", subset="glasses")
    with pytest.raises(ValueError, match="not both"):
        WFLWOriginal(root, "test_blur", subset="pose")
    with pytest.raises(ValueError, match="split must be"):
        WFLWOriginal(root, "val")


def test_original_cache(original, tmp_path_factory):
    root, _, _, _ = original
    cache = tmp_path_factory.mktemp("cache")
    ds = WFLWOriginal(root, "test", size=S, cache_dir=cache)
    first = ds[1]
    files = list(cache.glob("*.png"))
    assert len(files) == 1 and files[0].name.startswith("1_")
    # a later access reads the cache: prove it by changing the cached pixels
    marked = cv2.imread(str(files[0]))
    marked[0, 0] = (1, 2, 3)
    cv2.imwrite(str(files[0]), marked)
    again = ds[1]
    assert tuple(denormalize(again["image"])[0, 0]) == (3, 2, 1)
    torch.testing.assert_close(again["kpts"], first["kpts"])
    # another crop size is a different cache entry
    WFLWOriginal(root, "test", size=S + 2, cache_dir=cache)[1]
    assert len(list(cache.glob("*.png"))) == 2


def test_original_bad_lines_and_missing_files(original):
    root, lms, _, ann = original
    good = ann.read_text().splitlines()
    ann.write_text("\n".join([good[0], good[1].replace(" 0--Parade/1.png", "")]) + "\n")
    with pytest.raises(AnnotationError, match=r"list_98pt_rect_attr_test\.txt:2: expected 207 tokens .*got 206"):
        WFLWOriginal(root, "test")
    toks = good[2].split()
    toks[200] = "2"
    ann.write_text("\n".join([good[0], good[1], " ".join(toks)]) + "\n")
    with pytest.raises(AnnotationError, match=r"test\.txt:3: attribute flags must be 0 or 1"):
        WFLWOriginal(root, "test")
    toks = good[0].split()
    toks[197] = "ten"
    ann.write_text(" ".join(toks) + "\n")
    with pytest.raises(AnnotationError, match=r"test\.txt:1: token 198 is not a number: 'ten'"):
        WFLWOriginal(root, "test")
    ann.write_text("\n".join(good) + "\n")
    (root / "WFLW_images" / "0--Parade" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"^1 of the 3 image files listed in .*list_98pt_rect_attr_test\.txt "
                                                r"are missing: \S*WFLW_images/0--Parade/2\.png$"):
        WFLWOriginal(root, "test", size=S)
    assert len(WFLWOriginal(root, "test_largepose", size=S)) == 1   # a subset checks only its own images
    with pytest.raises(FileNotFoundError, match="list_98pt_rect_attr_train.txt"):
        WFLWOriginal(root, "train")


def test_many_missing_images_are_counted_and_the_first_five_named(tmp_path):
    write_cropped_list(tmp_path, [f"{i}.png " + fmt(np.full(196, 0.5)) for i in range(8)])
    write_rgb(tmp_path / "test" / "7.png", np.zeros((S, S, 3), np.uint8))
    with pytest.raises(FileNotFoundError) as ei:
        WFLWCropped(tmp_path, "test", image_size=S)
    msg = str(ei.value)
    assert msg.startswith("7 of the 8 image files listed in ") and msg.endswith(" (and 2 more)")
    assert [f"test/{i}.png" in msg for i in range(8)] == [True] * 5 + [False] * 3
