"""The one metrics registry: a task's ``spec.metric`` names the function that scores its predictions.

Each entry is ``(predictions, items, spec) -> {metric: value}``: classification predictions are class
indices (or regression scores) against ``item.label``; generation predictions are texts against
``item.references``. The scorers import their modules when called, so an optional dependency (Java for
METEOR) is only needed by the tasks that use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lorakit.errors import ConfigError

MetricFn = Callable[[Sequence[Any], Sequence[Any], Any], dict[str, Any]]
METRICS: dict[str, MetricFn] = {}


def register_metric(name: str, fn: MetricFn) -> MetricFn:
    """Make ``TaskSpec(metric=name)`` score with ``fn(predictions, items, spec)``.

    Args:
        name: the metric set's name.
        fn: the scorer.
    """
    if name in METRICS and METRICS[name] is not fn:
        raise ConfigError(f"metric set {name!r} is already registered")
    METRICS[name] = fn
    return fn


def get_metric(name: str) -> MetricFn:
    """The scorer called ``name``; an unknown name is an error listing the known ones."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric set {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def text_metrics(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean of per-class F1 over the label set) for text classification.

    Args:
        predictions / references: class indices.
        num_labels: the size of the label set.
    """
    from lorakit.metrics.glue import accuracy, binary_f1

    result = {"accuracy": accuracy(predictions, references)}
    result["macro_f1"] = float(
        np.mean([binary_f1(predictions, references, positive=c) for c in range(num_labels)])
    )
    return result


def _glue(predictions: Sequence[Any], items: Sequence[Any], spec: Any) -> dict[str, Any]:
    from lorakit.metrics.glue import glue_metrics

    return glue_metrics(spec.name, predictions, [ex.label for ex in items])


def _text(predictions: Sequence[Any], items: Sequence[Any], spec: Any) -> dict[str, Any]:
    return text_metrics(predictions, [ex.label for ex in items], spec.num_labels or 2)


def _texts(hyps: Sequence[str]) -> list[str]:
    # An empty hypothesis would make several scorers fail; score it as a single unknown token.
    return [h or "<empty>" for h in hyps]


def _e2e(hyps: Sequence[str], items: Sequence[Any], spec: Any) -> dict[str, Any]:
    from lorakit.metrics.nlg import nlg_metrics

    return nlg_metrics(_texts(hyps), [it.references for it in items])


def _d2t(hyps: Sequence[str], items: Sequence[Any], spec: Any, seen: bool = False) -> dict[str, Any]:
    from lorakit.metrics.d2t import d2t_metrics

    groups = [it.seen for it in items] if seen else None
    return d2t_metrics(_texts(hyps), [it.references for it in items], seen=groups)


register_metric("glue", _glue)
register_metric("text", _text)
register_metric("e2e", _e2e)
register_metric("d2t", _d2t)
register_metric("webnlg", lambda hyps, items, spec: _d2t(hyps, items, spec, seen=True))  # + seen/unseen
