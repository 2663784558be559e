"""Evaluation metrics: GLUE task metrics, the E2E NLG challenge metrics, and the registry tasks score with."""

from lorakit.metrics.glue import (
    MetricError,
    accuracy,
    binary_f1,
    glue_metrics,
    matthews_corr,
    pearson_corr,
    spearman_corr,
)
from lorakit.metrics.nlg import (
    NLG_METRIC_NAMES,
    MeteorScorer,
    MissingJavaError,
    bleu,
    cider,
    coco_tokenize,
    java_available,
    mteval_tokenize,
    nist,
    nlg_metrics,
    rouge_l,
)
from lorakit.metrics.registry import METRICS, get_metric, register_metric, text_metrics

__all__ = [
    "METRICS",
    "NLG_METRIC_NAMES",
    "MeteorScorer",
    "MetricError",
    "MissingJavaError",
    "accuracy",
    "binary_f1",
    "bleu",
    "cider",
    "coco_tokenize",
    "get_metric",
    "glue_metrics",
    "java_available",
    "matthews_corr",
    "mteval_tokenize",
    "nist",
    "nlg_metrics",
    "pearson_corr",
    "register_metric",
    "rouge_l",
    "spearman_corr",
    "text_metrics",
]
