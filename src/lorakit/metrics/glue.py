"""GLUE metrics as GLUE defines them: accuracy; F1 (positive class 1) for MRPC/QQP; Matthews
correlation for CoLA; Pearson and Spearman correlation for STS-B. Values are fractions in [0, 1]
(correlations in [-1, 1]), not percentages."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from lorakit.data.glue import get_glue_task
from lorakit.errors import LorakitError

__all__ = [
    "MetricError",
    "accuracy",
    "binary_f1",
    "glue_metrics",
    "matthews_corr",
    "pearson_corr",
    "spearman_corr",
]


class MetricError(LorakitError, ValueError):
    """Metric inputs are malformed (length mismatch, empty, wrong type or range)."""


def _pair(predictions: Sequence, references: Sequence) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.ndim != 1 or r.ndim != 1:
        raise MetricError(f"predictions and references must be 1-D, got shapes {p.shape} and {r.shape}")
    if len(p) != len(r):
        raise MetricError(f"{len(p)} predictions but {len(r)} references")
    if len(p) == 0:
        raise MetricError("no predictions to score")
    return p, r


def _as_labels(x: np.ndarray, name: str) -> np.ndarray:
    # Class predictions must be integral: a float array here usually means logits/probabilities.
    if x.dtype.kind == "b":
        return x.astype(np.int64)
    if x.dtype.kind in "iu":
        return x.astype(np.int64)
    if x.dtype.kind == "f" and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
        return x.astype(np.int64)
    raise MetricError(f"{name} must be integer class labels (did you pass logits?), got dtype {x.dtype}")


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to the reference."""
    p, r = _pair(predictions, references)
    return float(np.mean(_as_labels(p, "predictions") == _as_labels(r, "references")))


def binary_f1(predictions: Sequence[int], references: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class: 2TP / (2TP + FP + FN); 0.0 when there are no positives at all."""
    p, r = _pair(predictions, references)
    p, r = _as_labels(p, "predictions") == positive, _as_labels(r, "references") == positive
    tp = int(np.sum(p & r))
    fp = int(np.sum(p & ~r))
    fn = int(np.sum(~p & r))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_corr(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation coefficient (multi-class form; binary case is the usual phi).

    0.0 when it is undefined (all predictions or all references in one class), as sklearn does.
    """
    p, r = _pair(predictions, references)
    p, r = _as_labels(p, "predictions"), _as_labels(r, "references")
    classes, inv = np.unique(np.concatenate([r, p]), return_inverse=True)
    k, n = len(classes), len(r)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (inv[:n], inv[n:]), 1.0)
    t, q = conf.sum(axis=1), conf.sum(axis=0)  # true and predicted counts per class
    c, s = np.trace(conf), float(n)
    cov_pr = c * s - t @ q
    cov_pp = s * s - q @ q
    cov_tt = s * s - t @ t
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(cov_pr / math.sqrt(cov_pp * cov_tt))


def _corr(fn, predictions: Sequence[float], references: Sequence[float]) -> float:
    p, r = _pair(predictions, references)
    p, r = p.astype(np.float64), r.astype(np.float64)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(r))):
        raise MetricError("predictions and references must be finite numbers")
    if len(p) < 2 or np.all(p == p[0]) or np.all(r == r[0]):
        # Correlation with a constant is undefined; report NaN rather than a misleading number.
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(p, r)[0])


def pearson_corr(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson r (scipy.stats.pearsonr); NaN if either side is constant."""
    return _corr(stats.pearsonr, predictions, references)


def spearman_corr(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rho (scipy.stats.spearmanr, average ranks for ties); NaN if either side is constant."""
    return _corr(stats.spearmanr, predictions, references)


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "matthews_corr": matthews_corr,
    "pearson": pearson_corr,
    "spearman": spearman_corr,
}


def glue_metrics(task: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Score predictions for a GLUE task with the task's metrics (``GlueTask.metrics``).

    Classification tasks take class indices (argmax already applied); STS-B takes float scores.
    Raises :class:`MetricError` on a length mismatch, empty input, or out-of-range class labels.
    """
    try:
        spec = get_glue_task(task)
    except ValueError as exc:
        raise MetricError(str(exc)) from None
    p, r = _pair(predictions, references)
    if not spec.is_regression:
        for name, arr in (("predictions", p), ("references", r)):
            labels = _as_labels(arr, name)
            bad = labels[(labels < 0) | (labels >= spec.num_labels)]
            if bad.size:
                raise MetricError(
                    f"{task}: {name} contain label {int(bad[0])} outside 0..{spec.num_labels - 1}"
                )
    return {m: _METRIC_FNS[m](p, r) for m in spec.metrics}
