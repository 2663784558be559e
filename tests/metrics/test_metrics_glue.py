"""GLUE metrics against values worked out by hand (closed forms on small arrays)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.metrics import (
    MetricError,
    accuracy,
    binary_f1,
    glue_metrics,
    matthews_corr,
    pearson_corr,
    spearman_corr,
)

# preds vs refs: TP = 2 (idx 0, 4), TN = 1 (idx 2), FP = 1 (idx 1), FN = 1 (idx 3)
PRED = [1, 1, 0, 0, 1]
REF = [1, 0, 0, 1, 1]


def test_accuracy():
    assert accuracy(PRED, REF) == pytest.approx(3 / 5)
    assert accuracy(np.array([2, 0, 1]), np.array([2, 0, 1])) == 1.0


def test_binary_f1_closed_form():
    # F1 = 2TP / (2TP + FP + FN) = 4 / 6
    assert binary_f1(PRED, REF) == pytest.approx(2 / 3)
    # precision 1/3, recall 1 -> F1 = 2 * (1/3) / (4/3) = 1/2
    assert binary_f1([1, 1, 1], [1, 0, 0]) == pytest.approx(0.5)
    assert binary_f1([0, 0], [0, 0]) == 0.0  # no positives anywhere: defined as 0


def test_matthews_binary_closed_form():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corr(PRED, REF) == pytest.approx(1 / 6)
    assert matthews_corr([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corr([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corr([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0  # undefined -> 0, as sklearn


def test_matthews_binary_equals_phi_coefficient():
    rng = np.random.default_rng(0)
    p, r = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert matthews_corr(p, r) == pytest.approx(np.corrcoef(p, r)[0, 1])


def test_matthews_multiclass_closed_form():
    # Confusion (rows true, cols pred) for 3 classes:
    # true 0: [2,1,0]  true 1: [0,2,0]  true 2: [1,0,1]   n = 7, trace c = 5
    ref = [0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 1, 1, 1, 0, 2]
    t, p = np.array([3, 2, 2]), np.array([3, 3, 1])
    expected = (5 * 7 - t @ p) / math.sqrt((49 - p @ p) * (49 - t @ t))
    assert matthews_corr(pred, ref) == pytest.approx(expected)


def test_pearson_and_spearman():
    x = [1.0, 2.0, 3.0, 4.0]
    y = [1.0, 3.0, 2.0, 5.0]
    xm, ym = np.array(x) - 2.5, np.array(y) - 2.75
    assert pearson_corr(x, y) == pytest.approx(float(xm @ ym / math.sqrt((xm @ xm) * (ym @ ym))))
    # ranks of y: [1, 3, 2, 4], d = [0, 1, 1, 0] -> rho = 1 - 6*2 / (4*15) = 0.8
    assert spearman_corr(x, y) == pytest.approx(0.8)
    # monotone but non-linear: Spearman 1, Pearson below 1
    z = [1.0, 8.0, 27.0, 64.0]
    assert spearman_corr(x, z) == pytest.approx(1.0)
    assert pearson_corr(x, z) < 0.99
    assert math.isnan(pearson_corr([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_spearman_ties_use_average_ranks():
    # y ranks with ties averaged: [1.5, 1.5, 3, 4]; Pearson of ranks [1,2,3,4] vs that
    a, b = np.array([1, 2, 3, 4.0]), np.array([1.5, 1.5, 3, 4])
    am, bm = a - a.mean(), b - b.mean()
    expected = am @ bm / math.sqrt((am @ am) * (bm @ bm))
    assert spearman_corr([1, 2, 3, 4], [7, 7, 9, 10]) == pytest.approx(expected)


def test_glue_metrics_dispatch_per_task():
    assert glue_metrics("mrpc", PRED, REF) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert glue_metrics("QQP", PRED, REF) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert glue_metrics("cola", PRED, REF) == pytest.approx({"matthews_corr": 1 / 6})
    assert glue_metrics("sst-2", PRED, REF) == pytest.approx({"accuracy": 0.6})
    assert glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 1]) == pytest.approx({"accuracy": 0.75})
    stsb = glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0])
    assert set(stsb) == {"pearson", "spearman"} and stsb["spearman"] == pytest.approx(0.8)


def test_glue_metrics_errors():
    with pytest.raises(MetricError, match="4 predictions but 3 references"):
        glue_metrics("sst2", [0, 1, 0, 1], [0, 1, 0])
    with pytest.raises(MetricError, match="no predictions"):
        glue_metrics("sst2", [], [])
    with pytest.raises(MetricError, match="did you pass logits"):
        glue_metrics("sst2", [0.2, 0.9], [0, 1])
    with pytest.raises(MetricError, match=r"predictions contain label 2 outside 0\.\.1"):
        glue_metrics("rte", [0, 2], [0, 1])
    with pytest.raises(MetricError, match="unknown GLUE task"):
        glue_metrics("wnli", [0], [0])
    with pytest.raises(MetricError, match="1-D"):
        glue_metrics("sst2", [[0.1, 0.9]], [1])
