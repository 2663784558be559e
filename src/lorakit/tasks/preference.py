"""``dpo`` and ``orpo``: preference tuning of a causal LM on ``{prompt, chosen, rejected}`` pairs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.data.preference import find_preference_file, preference_splits
from lorakit.data.text import DataError
from lorakit.errors import ConfigError
from lorakit.tasks.spec import TaskData, TaskSpec, subsample

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig


def _files(cfg: TrainConfig) -> dict[str, Path | None]:
    """Files per role: --train-file / --valid-file / --eval-file, else train/valid|dev/test in --data."""
    given = Path(cfg.data) if cfg.data else None
    if given is not None and not given.exists():
        raise DataError(f"data path {given} not found")
    folder = given.parent if given is not None and given.is_file() else given
    files: dict[str, Path | None] = {}
    for role, explicit in (("train", cfg.train_file), ("valid", cfg.valid_file), ("test", cfg.eval_file)):
        if explicit:
            p = Path(explicit)
            p = p if p.is_absolute() or p.exists() or folder is None else folder / p
            if not p.is_file():
                raise DataError(f"{role} file {p} not found")
            files[role] = p
    if given is not None and given.is_file():
        files.setdefault("train", given)
    stems = {"train": ("train",), "valid": ("valid", "dev", "validation"), "test": ("test",)}
    for role, names in stems.items():
        if role not in files and folder is not None:
            files[role] = find_preference_file(folder, names)
    return files


def load_preference_task(cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    """TaskData of preference pairs; the loss settings and every data problem are checked here, before a
    model is loaded."""
    from lorakit.training.preference import PreferenceLoss

    PreferenceLoss.from_config(cfg)  # a bad beta / loss / smoothing stops the run before any loading
    if cfg.method != "lora" and cfg.init_adapter:
        raise ConfigError(f"init_adapter starts from a LoRA adapter; method {cfg.method!r} trains none")
    splits = preference_splits(_files(cfg), cfg.split_seed, valid_fraction=cfg.valid_split)
    eval_role = cfg.eval_split or "test"
    if eval_role not in splits:
        raise ConfigError(f"eval_split for {cfg.task} must be one of {list(splits)}, got {eval_role!r}")
    # No metric set: rewards need the model and its reference, so lorakit.training.preference scores them.
    out = TaskData(TaskSpec(cfg.task.lower(), "preference", "causal-lm"))
    if "train" in roles:
        out.train = subsample(splits["train"], cfg.max_train_samples, cfg.split_seed)
    if "valid" in roles:
        out.valid = subsample(splits["valid"], cfg.max_eval_samples, cfg.split_seed)  # load_task caps it
    if "eval" in roles:
        out.eval = subsample(splits[eval_role], cfg.max_eval_samples, cfg.split_seed)
    return out
