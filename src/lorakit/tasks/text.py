"""``text``: classification from the user's CSV/TSV/JSONL files, scored with accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.data import DataError, Example, load_text_classification
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
    ``--train-file`` / ``--valid-file`` / ``--eval-file`` override, relative to that folder."""
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
    eval_path = pick(cfg.eval_file, ("test", "dev", "valid", "validation"))
    valid_path = pick(cfg.valid_file, ("dev", "valid", "validation")) or eval_path
    if ("eval" in roles or "valid" in roles) and eval_path is None:
        raise DataError(
            f"no evaluation file in {folder}: expected test/dev/valid .csv/.tsv/.jsonl (or --eval-file)"
        )
    return train_path, valid_path, eval_path


def load_text_task(cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    """Train / valid / eval examples from the files in (or named by) ``cfg.data`` (see ``text_files``)."""
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
    out = TaskData(
        spec, train=subsample(train, cfg.max_train_samples, cfg.split_seed) if "train" in roles else []
    )
    for role, path in (("eval", eval_path), ("valid", valid_path)):
        if role in roles:
            setattr(out, role, subsample(read(path, names)[0], cfg.max_eval_samples, cfg.split_seed))  # type: ignore[arg-type]
    return out
