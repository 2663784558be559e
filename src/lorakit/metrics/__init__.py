"""Evaluation metrics: GLUE task metrics and the E2E NLG challenge metrics."""

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

__all__ = [
    "NLG_METRIC_NAMES",
    "MeteorScorer",
    "MetricError",
    "MissingJavaError",
    "accuracy",
    "binary_f1",
    "bleu",
    "cider",
    "coco_tokenize",
    "glue_metrics",
    "java_available",
    "matthews_corr",
    "mteval_tokenize",
    "nist",
    "nlg_metrics",
    "pearson_corr",
    "rouge_l",
    "spearman_corr",
]
