"""``webnlg`` and ``dart`` (data-to-text) and ``sft`` (prompt/completion or chat records): causal-LM tasks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.data.files import DiskSplit, disk_splits, is_saved_dataset
from lorakit.data.sft import find_sft_file, group_references, sft_splits
from lorakit.data.text import DataError
from lorakit.data.webnlg import d2t_splits, load_dart, load_webnlg
from lorakit.errors import ConfigError
from lorakit.tasks.spec import TaskData, TaskSpec, subsample

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

# Linearised triple sets run long: 128 tokens would cut a large share of the inputs (docs/training.md).
D2T_RECIPE = {"max_length": 512}

D2T_ROLE_FILES = {"train": ("train",), "valid": ("valid", "dev"), "test": ("test",)}


def _explicit(cfg: TrainConfig, folder: Path | None) -> dict[str, Path]:
    out = {}
    for role, given in (("train", cfg.train_file), ("valid", cfg.valid_file), ("test", cfg.eval_file)):
        if given:
            p = Path(given)
            p = p if p.is_absolute() or p.exists() or folder is None else folder / p
            if not p.is_file():
                raise DataError(f"{role} file {p} not found")
            out[role] = p
    return out


def _d2t_files(cfg: TrainConfig) -> dict[str, Path]:
    """Files per role: explicit flags, else ``train/valid|dev/test.json`` in --data (or --data the file)."""
    given = Path(cfg.data) if cfg.data else None
    if given is not None and not given.exists():
        raise DataError(f"data path {given} not found")
    folder = given.parent if given is not None and given.is_file() else given
    files = _explicit(cfg, folder)
    if given is not None and given.is_file() and not files:
        return {"valid": given}  # one file (the LoRA repo ships dev.json): every split is carved from it
    for role, stems in D2T_ROLE_FILES.items():
        found = [folder / f"{s}.json" for s in stems] if folder is not None else []
        hit = next((p for p in found if p.is_file()), None)
        if role not in files and hit is not None:
            files[role] = hit
    if not files:
        raise DataError(f"no {cfg.task} data in {folder}: expected train.json / dev.json / test.json")
    return files


def _load_d2t(cfg: TrainConfig) -> dict[str, list[Any]]:
    files = _d2t_files(cfg)
    loader = load_webnlg if cfg.task.lower() == "webnlg" else load_dart
    return d2t_splits({r: loader(p) for r, p in files.items()}, files, seed=cfg.split_seed)


def _sft_files(cfg: TrainConfig) -> dict[str, Path | DiskSplit | None]:
    given = Path(cfg.data) if cfg.data else None
    if given is not None and not given.exists():
        raise DataError(f"data path {given} not found")
    if given is not None and given.is_dir() and is_saved_dataset(given):
        return {**disk_splits(given), **_explicit(cfg, given)}  # type: ignore[dict-item]
    folder = given.parent if given is not None and given.is_file() else given
    files: dict[str, Path | DiskSplit | None] = dict(_explicit(cfg, folder))
    if given is not None and given.is_file():
        files.setdefault("train", given)
    stems = {"train": ("train",), "valid": ("valid", "dev", "validation"), "test": ("test",)}
    for role, names in stems.items():
        if role not in files and folder is not None:
            files[role] = find_sft_file(folder, names)
    return files


def _sft_splits(cfg: TrainConfig, notes: list[str]) -> dict[str, list[Any]]:
    fields = (cfg.prompt_field, cfg.completion_field, cfg.messages_field)
    return sft_splits(_sft_files(cfg), cfg.split_seed, fields, valid_fraction=cfg.valid_split,
                      data_format=cfg.format, field_map=cfg.field_map, notes=notes)  # fmt: skip


def load_nlg_task(cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    """TaskData for webnlg / dart / sft; every data problem is raised here, before a model is loaded."""
    task = cfg.task.lower()
    notes: list[str] = []
    if task == "sft":
        splits: dict[str, list[Any]] = _sft_splits(cfg, notes)
    else:
        splits = _load_d2t(cfg)
    eval_role = cfg.eval_split or "test"
    if eval_role not in splits:
        raise ConfigError(f"eval_split for {task} must be one of {list(splits)}, got {eval_role!r}")
    recipe = dict(D2T_RECIPE) if task != "sft" else {}
    metric = {"webnlg": "webnlg"}.get(task, "d2t")
    out = TaskData(TaskSpec(task, "generation", "causal-lm", metric=metric, recipe=recipe), notes=notes)
    if "train" in roles:
        train = splits["train"]
        if task != "sft":  # one training example per (input, reference) pair, as for E2E
            train = [type(it)(it.mr, [ref], it.category, it.seen) for it in train for ref in it.references]
        out.train = subsample(train, cfg.max_train_samples, cfg.split_seed)
    if "valid" in roles:
        out.valid = subsample(splits["valid"], cfg.max_eval_samples, cfg.split_seed)
    if "eval" in roles:
        # SFT: one prompt answered several times is one example scored against all its answers, as E2E's MRs
        scored = group_references(splits[eval_role]) if task == "sft" else splits[eval_role]
        out.eval = subsample(scored, cfg.max_eval_samples, cfg.split_seed)
        if splits[eval_role] is splits["valid"] and eval_role != "valid":
            out.scored_on = "the validation split (no test file)"
    return out
