import subprocess
import sys

import cv2
import numpy as np
import pytest

from ldeq_fast.data.transforms import affine_from_bbox, warp
from ldeq_fast.images import ImageError, as_rgb_uint8, check_box, crop_face, list_images, read_image

RGB = (np.arange(6 * 8 * 3).reshape(6, 8, 3) * 5 % 256).astype(np.uint8)


def test_layouts_and_dtypes_become_rgb_uint8():
    grey = RGB[:, :, 0]
    assert (as_rgb_uint8(grey) == grey[:, :, None]).all() and as_rgb_uint8(grey).shape == (6, 8, 3)
    assert (as_rgb_uint8(grey[:, :, None]) == as_rgb_uint8(grey)).all()
    rgba = np.dstack([RGB, np.full((6, 8), 255, np.uint8)])
    assert (as_rgb_uint8(rgba) == RGB).all()
    rgba[0, 0, 3] = 0
    assert (as_rgb_uint8(rgba)[0, 0] == 0).all()                      # transparent over black
    assert (as_rgb_uint8(RGB.astype(np.uint16) * 257) == RGB).all()   # 16-bit
    assert (as_rgb_uint8(RGB / 255.0) == RGB).all()
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        as_rgb_uint8(RGB.astype(np.float32))
    with pytest.raises(ImageError, match="dtype int64"):
        as_rgb_uint8(RGB.astype(np.int64))
    with pytest.raises(ImageError, match="shape"):
        as_rgb_uint8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        as_rgb_uint8([[1, 2]])


def test_image_files(tmp_path):
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
    assert (read_image(tmp_path / "c.png") == RGB).all()
    cv2.imwrite(str(tmp_path / "g16.png"), RGB[:, :, 0].astype(np.uint16) * 257)
    assert (read_image(tmp_path / "g16.png") == RGB[:, :, :1]).all()
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR), np.full((6, 8), 255, np.uint8)]))
    assert (read_image(tmp_path / "a.png") == RGB).all()
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(ImageError, match="notes.jpg: not a readable image"):
        read_image(tmp_path / "notes.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    assert [p.name for p in list_images([tmp_path])] == ["a.png", "c.png", "empty.png", "g16.png", "notes.jpg"]


def test_a_file_over_opencvs_pixel_limit_is_reported(tmp_path):
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((100, 100, 3), np.uint8))
    code = ("import sys; from ldeq_fast.images import read_image\n"
            "try: read_image(sys.argv[1])\nexcept ValueError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")], capture_output=True, text=True,
                         env={**__import__("os").environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"}, timeout=120)
    assert "OPENCV_IO_MAX_IMAGE_PIXELS" in out.stdout, out.stdout + out.stderr


def test_crop_is_the_published_rule_and_boxes_are_checked():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    box = [100, 50, 180, 140]
    crop, A = crop_face(img, box, 128)
    np.testing.assert_allclose(A, affine_from_bbox(box, 1.2, 128))
    assert (crop == warp(img, A, 128)).all()          # the region-of-interest warp is the same resampling
    with pytest.raises(ImageError, match="outside the 300x200 image"):
        check_box([400, 10, 500, 80], img.shape)
    with pytest.raises(ImageError, match="x2 > x1"):
        check_box([50, 10, 40, 80], img.shape)
    with pytest.raises(ImageError, match="outside"):
        crop_face(img, [-500, -500, -400, -400], 128)


def test_a_large_face_is_cropped_from_a_pyramid_level_without_aliasing():
    # fine stripes on a big face: plain bilinear sampling at 1/8 scale aliases them, area averaging does not
    yy, xx = np.mgrid[0:2048, 0:2048]
    img = np.repeat(((xx // 2) % 2 * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    box = [400, 400, 1253, 1253]                 # side 1.2 * 853 = 1024 px -> 128: 1/8 scale
    crop, A = crop_face(img, box, 128)
    naive = warp(img, A, 128)
    assert abs(float(crop.mean()) - 127.5) < 10 and float(crop.std()) < 20      # a flat grey, as it should be
    assert abs(float(naive.mean()) - 127.5) > 30 or float(naive.std()) > 40   # aliasing
