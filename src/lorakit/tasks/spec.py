"""What a task is to the trainer (``TaskSpec``) and the examples it loaded (``TaskData``)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lorakit.data import E2EItem

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig


@dataclass
class TaskSpec:
    """What the trainer needs to know about a task."""

    name: str  # canonical: the task registry's name (a GLUE name, "text", "e2e" …)
    kind: str  # "classification", "regression" or "generation"
    model_task: str  # lorakit.io.models.load_model task: "seq-cls" or "causal-lm"
    num_labels: int | None = None
    label_names: list[str] = field(default_factory=list)
    # Regression: the score range, mapped to [0, 1] for training and back for predictions. An unscaled
    # 0-5 target makes the tanh-bounded BERT pooler saturate and the model collapse onto the mean score.
    target_range: tuple[float, float] | None = None
    # Classification: per-class loss weights (None: plain cross-entropy); see ``balanced_class_weights``.
    class_weights: list[float] | None = None
    # TrainConfig defaults this task's recipe sets where they differ from its kind's (keys: RECIPE_FIELDS of
    # lorakit.training.config, e.g. RTE's head_lr_ratio, init, train_pooler); a field the user set wins.
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()  # GLUE: the task's official metrics
    metric: str = ""  # the entry of lorakit.metrics.METRICS that scores it ("glue", "text", "e2e", "d2t" …)

    def scale_target(self, value: float) -> float:
        """A regression label in the model's [0, 1] training scale (identity without a range)."""
        if self.target_range is None:
            return float(value)
        lo, hi = self.target_range
        return (float(value) - lo) / (hi - lo)

    def unscale_prediction(self, value: float) -> float:
        """A model output back in the task's own score range (the inverse of ``scale_target``)."""
        if self.target_range is None:
            return float(value)
        lo, hi = self.target_range
        return float(value) * (hi - lo) + lo

    @property
    def is_glue(self) -> bool:
        return self.metric == "glue"


@dataclass
class TaskData:
    """Raw examples per role: ``train`` (fit), ``valid`` (scored during training), ``eval`` (final score)."""

    spec: TaskSpec
    train: list[Any] = field(default_factory=list)
    valid: list[Any] = field(default_factory=list)
    eval: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how splits were made, shown to the user
    # What the final metrics are measured on when no eval file exists ("the validation split, carved from
    # train.csv"); empty when an eval file is scored. Written into metrics.jsonl and the run summary.
    scored_on: str = ""


def subsample(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """A fixed random subset (original order kept); the same for every training seed."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]



def cap_valid(data: TaskData, cfg: TrainConfig) -> TaskData:
    """Bound the validation split by ``max_valid_samples`` examples: it is scored at every interval, so an
    uncapped valid file (E2E's has 547 MRs, 4,672 references) can cost more than the training itself.
    Generation tasks validate on the teacher-forced loss of (input, reference) pairs, so pairs are counted."""
    if cfg.max_valid_samples is None:
        return data
    valid = data.valid
    if data.spec.kind == "generation" and valid and isinstance(valid[0], E2EItem):
        valid = [replace(it, references=[ref]) for it in valid for ref in it.references]
    if len(valid) > cfg.max_valid_samples:
        data.valid = subsample(valid, cfg.max_valid_samples, cfg.split_seed)
    return data


