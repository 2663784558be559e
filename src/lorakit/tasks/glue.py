"""GLUE tasks (``sst2 mrpc cola rte stsb qnli qqp mnli``): GLUE's TSV files, scored on the dev split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lorakit.data import Example, get_glue_task, glue_split_exists, load_glue
from lorakit.data.splits import carve_valid
from lorakit.errors import ConfigError
from lorakit.tasks.spec import TaskData, TaskSpec, subsample

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

GLUE_CARVE_MAX = 1000  # the most examples carved from train when a task folder has no dev file
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
    fraction = min(cfg.valid_split, GLUE_CARVE_MAX / len(train))
    regression = get_glue_task(task).is_regression
    carved = carve_valid(train, fraction, cfg.split_seed, task=task, source="train.tsv",
                         stratify=None if regression else (lambda ex: ex.label))
    notes.append(f"{carved.note} (no {eval_split} file in {cfg.data})")
    return carved.train, carved.valid


def glue_spec(task: str) -> TaskSpec:
    """What GLUE task ``task`` is to the trainer (labels, score range, metrics, recipe).

    Args:
        task: a GLUE task name.
    """
    glue = get_glue_task(task)
    return TaskSpec(
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
    spec = glue_spec(glue.name)
    eval_split = cfg.eval_split or glue.splits[1]  # dev (MNLI: dev_matched)
    out = TaskData(spec)
    train, scored = _glue_train_and_scored(glue.name, cfg, eval_split, roles, out.notes)
    if "train" in roles:
        out.train = subsample(train, cfg.max_train_samples, cfg.split_seed)
    # GLUE reports dev; selecting on dev is what the paper and GLUE baselines do.
    scored = subsample(scored, cfg.max_eval_samples, cfg.split_seed)
    out.valid = scored if "valid" in roles else []
    out.eval = scored if "eval" in roles else []
    if out.notes and out.eval:
        out.scored_on = "the validation split carved from train (no dev file)"
    return out
