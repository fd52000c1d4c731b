"""Metrics exactly as METHOD.md: one confusion matrix, background truth excluded, nan-aware mIoU."""
import math

import numpy as np
import pytest
import torch

from wsss.train.metrics import ConfusionMatrix, multilabel_f1, segmentation_scores


def test_hand_computed_example():
    truth = np.array([[0, 0, 1, 1], [2, 2, 4, 4]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 3]])
    cm = ConfusionMatrix(4, background_index=4)
    cm.update(truth, pred)
    s = cm.scores(["a", "b", "c", "d"])
    # class 0: TP 1, FP 1 (c->0), FN 1 -> 1/3 ; class 1: TP 2, FP 1, FN 0 -> 2/3 ;
    # class 2: TP 1, FN 1 -> 1/2 ; class 3: absent in truth and prediction (bg pixels excluded) -> nan
    assert s["iou"]["a"] == pytest.approx(1 / 3)
    assert s["iou"]["b"] == pytest.approx(2 / 3)
    assert s["iou"]["c"] == pytest.approx(1 / 2)
    assert math.isnan(s["iou"]["d"])
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["acc"] == pytest.approx(4 / 6)
    assert s["fwiou"] == pytest.approx(2 / 6 * 1 / 3 + 2 / 6 * 2 / 3 + 2 / 6 * 1 / 2)
    assert s["pixels"] == 6


def test_accumulates_over_batches_like_one_matrix():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, size=(6, 20, 20))
    pred = rng.integers(0, 4, size=(6, 20, 20))
    one = ConfusionMatrix(4, 4)
    one.update(truth, pred)
    many = ConfusionMatrix(4, 4)
    for t, p in zip(truth, pred):
        many.update(torch.from_numpy(t), torch.from_numpy(p))
    assert np.array_equal(one.matrix, many.matrix)
    ref = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(truth.ravel(), pred.ravel()):
        if t < 4:
            ref[t, p] += 1
    assert np.array_equal(one.matrix, ref)


def test_background_prediction_on_tissue_is_a_miss():
    cm = ConfusionMatrix(2, background_index=2)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    s = cm.scores()
    assert s["iou"]["0"] == pytest.approx(0.5)
    assert s["acc"] == pytest.approx(3 / 4)


def test_perfect_and_empty():
    s = segmentation_scores(np.diag([5, 3, 0]))
    assert s["miou"] == 1.0 and s["acc"] == 1.0 and s["fwiou"] == pytest.approx(1.0)
    e = segmentation_scores(np.zeros((3, 3)))
    assert math.isnan(e["miou"]) and math.isnan(e["acc"])


def test_multilabel_f1():
    t = torch.tensor([[1, 0], [1, 1], [0, 1]])
    p = torch.tensor([[1, 0], [0, 1], [0, 0]])
    f = multilabel_f1(t, p)
    assert f["per_class"][0] == pytest.approx(2 / 3)
    assert f["per_class"][1] == pytest.approx(2 / 3)
    assert f["micro"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 2))
