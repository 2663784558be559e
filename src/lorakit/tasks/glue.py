"""GLUE tasks (``sst2 mrpc cola rte stsb qnli qqp mnli``): GLUE's TSV files, scored on the dev split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lorakit.data import DataError, Example, get_glue_task, glue_split_exists, load_glue
from lorakit.errors import ConfigError
from lorakit.tasks.spec import TaskData, TaskSpec, subsample

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

GLUE_CARVE_FRACTION = 0.1  # of train, held out when a task folder has no dev file (STS-B here)
GLUE_CARVE_MAX = 1000
# Task recipes that differ from the classification defaults; RTE's head collapses at 10 x and learns better
# with PEFT's choices (docs/records/training-defaults.md, "RTE").
RECIPES: dict[str, dict[str, Any]] = {"rte": {"head_lr_ratio": 1.0, "init": "kaiming", "train_pooler": False}}


def _glue_train_and_scored(
    task: str, cfg: TrainConfig, eval_split: str, roles: Sequence[str], notes: list[str]
) -> tuple[list[Example], list[Example]]:
    """(train, scored) examples, each read only if ``roles`` need it. Without a file for ``eval_split``, a
    fixed held-out part of train (seeded by ``split_seed``) is scored and left out of training, so the two
    never overlap."""
    wants_train, wants_scored = "train" in roles, "valid" in roles or "eval" in roles
    if cfg.eval_split or glue_split_exists(task, cfg.data, eval_split):  # a named split must exist
        train = load_glue(task, cfg.data, "train") if wants_train else []
        return train, load_glue(task, cfg.data, eval_split) if wants_scored else []
    train = load_glue(task, cfg.data, "train")
    n_held = min(GLUE_CARVE_MAX, max(1, round(GLUE_CARVE_FRACTION * len(train))))
    if len(train) - n_held < 1:
        raise DataError(f"{task}: {len(train)} training example(s) are too few to carve a {eval_split} split")
    held = set(random.Random(cfg.split_seed).sample(range(len(train)), n_held))
    notes.append(
        f"no {task} {eval_split} file in {cfg.data}: scoring {n_held} examples held out of train.tsv "
        f"(split_seed {cfg.split_seed}), training on the other {len(train) - n_held}"
    )
    return [ex for i, ex in enumerate(train) if i not in held], [ex for i, ex in enumerate(train) if i in held]



def load_glue_task(task: str, cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    """GLUE task ``task``'s examples of ``roles``: train, and dev (or a carved split) for valid and eval.

    Args:
        task: a GLUE task name.
        cfg: the run's settings (``data`` is the task folder).
        roles: which of train / valid / eval to read.
    """
    glue = get_glue_task(task)
    for name in ("train_file", "valid_file", "eval_file"):
        if getattr(cfg, name):
            raise ConfigError(f"{name} is not used for GLUE tasks: point --data at the task folder instead")
    spec = TaskSpec(
        name=glue.name,
        kind="regression" if glue.is_regression else "classification",
        model_task="seq-cls",
        num_labels=glue.num_labels,
        label_names=list(glue.labels),
        target_range=glue.score_range,
        metrics=glue.metrics,
        metric="glue",
        recipe=dict(RECIPES.get(glue.name, {})),
    )
    eval_split = cfg.eval_split or glue.splits[1]  # dev (MNLI: dev_matched)
    out = TaskData(spec)
    train, scored = _glue_train_and_scored(glue.name, cfg, eval_split, roles, out.notes)
    if "train" in roles:
        out.train = subsample(train, cfg.max_train_samples, cfg.split_seed)
    # GLUE reports dev; selecting on dev is what the paper and GLUE baselines do.
    scored = subsample(scored, cfg.max_eval_samples, cfg.split_seed)
    out.valid = scored if "valid" in roles else []
    out.eval = scored if "eval" in roles else []
    return out
