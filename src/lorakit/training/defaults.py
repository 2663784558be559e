"""The run-dependent defaults a ``TrainConfig`` leaves open (None): learning rate, head lr ratio, LoRA init,
pooler training and the memory settings, resolved once the task's kind and recipe are known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lorakit.errors import ConfigError
from lorakit.lora.config import DEFAULT_INIT
from lorakit.training.config import TrainConfig

# The peak lr a run gets when none is given: small-parameter methods want larger steps than full fine-tuning
# (measured on the parity cases, docs/records/results.md).
DEFAULT_LR = {"classification": 1e-3, "regression": 1e-3, "generation": 5e-4, "preference": 2e-4}
# A fresh classifier head needs larger steps than the adapter; a regression head does not
# (docs/records/training-defaults.md).
DEFAULT_HEAD_LR_RATIO = {"classification": 10.0, "regression": 1.0, "generation": 1.0, "preference": 1.0}
# The head lr the classification ratio gives at the default lr; a default ratio never puts the head above
# it, since higher spiked the head's loss (docs/records/training-defaults.md, "The cap on the head's lr").
MAX_DEFAULT_HEAD_LR = 1e-2
FULL_WEIGHT_LR = 5e-5
FULL_WEIGHT_METHODS = ("full", "fttop2")
# The fields a task's recipe (``TaskSpec.recipe``) may set: each defaults to None, meaning "not given".
RECIPE_FIELDS = ("lr", "head_lr_ratio", "init", "train_pooler", "max_length")
# The longest example, in tokens, where neither the user nor the task's recipe says otherwise.
DEFAULT_MAX_LENGTH = 128


def default_head_lr_ratio(kind: str, lr: float) -> float:
    """The kind's head lr ratio, lowered where it would put the head above ``MAX_DEFAULT_HEAD_LR``, but
    never below 1 (the head then learns at the adapter's lr).

    Args:
        kind: the task kind, ``"classification"``, ``"regression"`` or ``"generation"``.
        lr: the run's resolved learning rate.
    """
    ratio = DEFAULT_HEAD_LR_RATIO[kind]
    return min(ratio, max(1.0, MAX_DEFAULT_HEAD_LR / lr))


def resolve_task_defaults(cfg: TrainConfig, kind: str, recipe: Mapping[str, Any] | None = None) -> TrainConfig:
    """``cfg`` with every run-dependent default filled in: the learning rate, the head's lr ratio, the LoRA
    init, whether the pooler trains, the longest example and, from ``quantize``, gradient checkpointing and
    the heap setting.

    Args:
        cfg: the run's config; fields the user set are kept.
        kind: the task kind, ``"classification"``, ``"regression"`` or ``"generation"``.
        recipe: the task's own defaults (``TaskSpec.recipe``, fields of ``RECIPE_FIELDS``); they win over
            the kind's, and a field the user set wins over them.
    """
    recipe = dict(recipe or {})
    unknown = sorted(set(recipe) - set(RECIPE_FIELDS))
    if unknown:
        raise ConfigError(f"a task recipe can set {list(RECIPE_FIELDS)} only, not {unknown}")
    full = cfg.method in FULL_WEIGHT_METHODS
    def first_set(name: str, default: Any) -> Any:  # the user's value, else the recipe's, else the default
        return next(v for v in (getattr(cfg, name), recipe.get(name), default) if v is not None)

    chosen = {"lr": first_set("lr", FULL_WEIGHT_LR if full else DEFAULT_LR[kind]),
              "init": first_set("init", DEFAULT_INIT), "train_pooler": first_set("train_pooler", True),
              "max_length": first_set("max_length", DEFAULT_MAX_LENGTH)}  # fmt: skip
    chosen["head_lr_ratio"] = first_set("head_lr_ratio", default_head_lr_ratio(kind, chosen["lr"]))
    # A quantized base is chosen to save memory: both memory settings default to on with it.
    saving = cfg.quantize is not None
    return dataclasses.replace(
        cfg, **chosen,
        gradient_checkpointing=saving if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing,
        return_freed_memory=saving if cfg.return_freed_memory is None else cfg.return_freed_memory,
    )  # fmt: skip
