"""``text``: classification from the user's CSV/TSV/JSONL files, scored with accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.data import DataError, Example, load_text_classification
from lorakit.data.splits import carve_valid
from lorakit.tasks.spec import TaskData, TaskSpec, subsample

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def _find_text_file(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in TEXT_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def text_files(cfg: TrainConfig, roles: Sequence[str]) -> tuple[Path, Path | None, Path | None]:
    """(train, valid, eval) files: ``--data`` is a folder (train.csv, dev.csv …) or the train file itself;
    ``--train-file`` / ``--valid-file`` / ``--eval-file`` override, relative to that folder. The eval file
    is ``test.*``; a ``dev``/``valid`` file is the validation split, never the scored one."""
    given = Path(cfg.data) if cfg.data else None
    if given is not None and not given.exists():
        raise DataError(f"data path {given} not found")
    folder = given.parent if given is not None and given.is_file() else given

    def pick(explicit: str | None, stems: Sequence[str]) -> Path | None:
        if explicit:
            p = Path(explicit)
            return p if p.is_absolute() or p.exists() or folder is None else folder / p
        return _find_text_file(folder, stems) if folder is not None else None

    train_path = given if given is not None and given.is_file() else pick(cfg.train_file, ("train",))
    if train_path is None:
        raise DataError(f"no train file in {folder}: expected train.csv/.tsv/.jsonl (or --train-file)")
    eval_path = pick(cfg.eval_file, ("test",))
    valid_path = pick(cfg.valid_file, ("dev", "valid", "validation"))
    if "train" not in roles and "eval" in roles and eval_path is None and valid_path is None:
        where = f"in {folder}" if folder is not None else f"beside {train_path}"
        raise DataError(f"no evaluation file {where}: expected test/dev/valid .csv/.tsv/.jsonl (or --eval-file)")
    return train_path, valid_path, eval_path


def load_text_task(cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    """Train / valid / eval examples from the files in (or named by) ``cfg.data`` (see ``text_files``).

    Without a valid file the validation split is carved from train (stratified by label, ``lorakit.data.
    splits``); without a test file the final metrics are those of the validation split, labelled so."""
    train_path, valid_path, eval_path = text_files(cfg, roles)

    def read(path: Path, names: list[str] | None) -> tuple[list[Example], list[str]]:
        return load_text_classification(path, cfg.text_column, cfg.text_pair_column, cfg.label_column, names)

    names = cfg.label_names
    train: list[Example] = []
    if "train" in roles or names is None:
        train, names = read(train_path, names)
    if names is not None and len(names) < 2:
        raise DataError(f"{train_path}: only one label ({names}); classification needs at least two")
    spec = TaskSpec(
        "text", "classification", "seq-cls", num_labels=len(names or []), label_names=list(names or []),
        metric="text",
    )
    out = TaskData(spec)
    if "train" in roles:
        if valid_path is None:
            carved = carve_valid(train, cfg.valid_split, cfg.split_seed, task="text", source=str(train_path),
                                 stratify=lambda ex: ex.label)
            train, out.valid = carved.train, carved.valid
            out.notes.append(carved.note)
        else:
            out.valid = read(valid_path, names)[0]
        out.train = subsample(train, cfg.max_train_samples, cfg.split_seed)
    elif "valid" in roles and valid_path is not None:
        out.valid = read(valid_path, names)[0]
    out.valid = subsample(out.valid, cfg.max_eval_samples, cfg.split_seed)
    if "eval" in roles:
        _set_eval(out, read, names, eval_path, valid_path, train_path, cfg)
    if "valid" not in roles:
        out.valid = []
    return out


def _set_eval(out: TaskData, read: Any, names: list[str] | None, eval_path: Path | None,
              valid_path: Path | None, train_path: Path, cfg: TrainConfig) -> None:
    """The scored split: the test file; else the validation split (its file, or carved), labelled so."""
    if eval_path is not None:
        out.eval = subsample(read(eval_path, names)[0], cfg.max_eval_samples, cfg.split_seed)
    elif valid_path is not None:
        out.eval = out.valid or subsample(read(valid_path, names)[0], cfg.max_eval_samples, cfg.split_seed)
        out.scored_on = f"the validation split ({valid_path}; no test file)"
    else:
        out.eval = out.valid
        out.scored_on = f"the validation split carved from {train_path} (no test file)" if out.valid else ""
