import numpy as np
import pytest

from ldeq_fast import metrics


def face(k=98, scale=1.0):
    g = np.zeros((k, 2))
    g[60] = [0.0, 0.0]
    g[72] = [10.0 * scale, 0.0]     # inter-ocular distance 10
    g[0] = [-5.0 * scale, -5.0 * scale]
    g[1] = [15.0 * scale, 15.0 * scale]
    return g


def test_nme_by_hand():
    gt = face()[None]
    pred = gt.copy()
    pred[0, 3] += [3.0, 4.0]        # one point off by 5
    e = metrics.nme_per_image(pred, gt)
    assert np.allclose(e, [5.0 / 98 / 10])
    # 68-point layout normalises by points 36 and 45
    g68 = np.zeros((1, 68, 2))
    g68[0, 45] = [4.0, 0.0]
    p68 = g68.copy()
    p68[0, 0] += [0.0, 68.0]
    assert np.allclose(metrics.nme_per_image(p68, g68), [68.0 / 68 / 4.0])
    assert np.allclose(metrics.nme_per_image(p68, g68, norm_indices=(0, 45)), [68.0 / 68 / 4.0])


def test_fr_auc_by_hand():
    fr, auc = metrics.fr_auc([0.0, 0.0, 0.2, 0.2])
    assert fr == 0.5
    assert abs(auc - 0.5) < 1e-9       # CED = 0.5 flat over [0, 0.1]
    fr, auc = metrics.fr_auc([0.05])
    assert fr == 0.0
    assert abs(auc - 0.5) < 2e-3       # step at the midpoint: half the area


def test_nmf_zero_for_constant_offset_and_by_hand():
    T = 5
    gt = np.stack([face() + t for t in range(T)])    # face translating, ranges 20 x 20
    assert metrics.video_nmf(gt + 2.0, gt) == 0.0
    pred = gt.copy()
    pred[2, 7] += [0.6, 0.8]                          # one point jumps by 1 px at frame 2, back at 3
    s = np.sqrt(20 * 20 / 256 ** 2)
    per_pair = np.array([0.0, 100 / s / np.sqrt(98), 100 / s / np.sqrt(98), 0.0])
    assert np.isclose(metrics.video_nmf(pred, gt), np.sqrt(np.mean(per_pair ** 2)))
    assert np.isclose(metrics.video_nme(pred, gt), 100 * np.mean([0, 0, 1 / 98 / 10, 0, 0]))


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(N, K, 2\)"):
        metrics.nme_per_image(np.zeros((2, 98)), np.zeros((2, 98)))
    with pytest.raises(ValueError, match="inter-ocular"):
        metrics.nme_per_image(np.zeros((1, 98, 2)), np.zeros((1, 98, 2)))
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.video_nmf(np.zeros((1, 98, 2)), np.zeros((1, 98, 2)))
    with pytest.raises(ValueError, match="norm_indices"):
        metrics.nme_per_image(np.ones((1, 5, 2)), np.ones((1, 5, 2)))
