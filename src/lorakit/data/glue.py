"""GLUE task specs and a strict loader for GLUE's original TSV files.

Files are expected in the layout GLUE's ``download_glue_data.py`` produces: ``<root>/<Task>/<split>.tsv``
(e.g. ``glue/SST-2/dev.tsv``, ``glue/MNLI/dev_matched.tsv``). They are read as tab-separated text
with quoting disabled, because GLUE sentences contain unbalanced ``"`` characters that a quoting
csv reader would silently merge across lines.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.text import DataError, Example, read_delimited

__all__ = ["GLUE_TASKS", "GlueTask", "get_glue_task", "glue_split_exists", "glue_task_names", "load_glue"]


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored and scored.

    ``header`` is the exact expected header (None: the file has none, as for CoLA). For MNLI, whose
    train and dev headers differ in length, ``header`` is None and ``named_columns`` lists the
    names checked at their positions instead. Column indices may be negative (counted from the end).
    """

    name: str
    dir_name: str
    header: tuple[str, ...] | None
    num_fields: int | None  # None: take the count from the header (MNLI train 12, dev 16)
    text_col: int
    text_pair_col: int | None
    label_col: int
    labels: tuple[str, ...]  # empty for regression
    metrics: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "dev")
    named_columns: tuple[tuple[int, str], ...] = ()
    score_range: tuple[float, float] | None = None  # regression only

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        """Model output size: 1 for regression (STS-B), else the number of classes."""
        return 1 if self.is_regression else len(self.labels)


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("sst2", "SST-2", ("sentence", "label"), 2, 0, None, 1, _BIN, ("accuracy",)),
        GlueTask(
            "mrpc",
            "MRPC",
            ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            5, 3, 4, 0, _BIN, ("accuracy", "f1"),
        ),
        # CoLA has no header: source, label, original acceptability mark, sentence.
        GlueTask("cola", "CoLA", None, 4, 3, None, 1, _BIN, ("matthews_corr",)),
        GlueTask(
            "rte", "RTE", ("index", "sentence1", "sentence2", "label"), 4, 1, 2, 3, _NLI2, ("accuracy",)
        ),
        GlueTask(
            "stsb",
            "STS-B",
            ("index", "genre", "filename", "year", "old_index", "source1", "source2",
             "sentence1", "sentence2", "score"),
            10, 7, 8, 9, (), ("pearson", "spearman"), score_range=(0.0, 5.0),
        ),
        GlueTask(
            "qnli", "QNLI", ("index", "question", "sentence", "label"), 4, 1, 2, 3, _NLI2, ("accuracy",)
        ),
        GlueTask(
            "qqp",
            "QQP",
            ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
            6, 3, 4, 5, _BIN, ("accuracy", "f1"),
        ),
        GlueTask(
            "mnli",
            "MNLI",
            None,
            None, 8, 9, -1,
            ("contradiction", "entailment", "neutral"),
            ("accuracy",),
            splits=("train", "dev_matched", "dev_mismatched"),
            named_columns=((8, "sentence1"), (9, "sentence2"), (-1, "gold_label")),
        ),
    )
}


def glue_task_names() -> list[str]:
    """The supported task names."""
    return list(GLUE_TASKS)


def get_glue_task(task: str) -> GlueTask:
    """Look up a task by name; case, ``-`` and ``_`` are ignored (``"SST-2"`` == ``"sst2"``)."""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _resolve_file(spec: GlueTask, data_dir: Path, split: str) -> Path:
    """``data_dir`` may be the GLUE root (holding ``SST-2/`` …) or the task's own folder."""
    in_root = data_dir / spec.dir_name / f"{split}.tsv"
    if in_root.exists():
        return in_root
    direct = data_dir / f"{split}.tsv"
    if direct.exists() and data_dir.name.lower().replace("-", "") == spec.dir_name.lower().replace("-", ""):
        return direct
    raise DataError(f"{spec.name} {split} split not found: expected {in_root} (or {direct})")


def glue_split_exists(task: str, data_dir: str | Path, split: str) -> bool:
    """Whether ``split``'s TSV file is present for ``task`` under ``data_dir`` (root or task folder).

    Args:
        task: a GLUE task name (any spelling ``get_glue_task`` accepts).
        data_dir: the GLUE root or the task's own folder.
        split: a split name such as ``"dev"``.
    """
    try:
        _resolve_file(get_glue_task(task), Path(data_dir), split)
    except DataError:
        return False
    return True


def _check_header(spec: GlueTask, path: Path, header: list[str]) -> int:
    """Validate the header row and return the number of fields every row must have."""
    if spec.header is not None:
        if tuple(header) != spec.header:
            raise DataError(
                f"{path}, line 1: unexpected header for {spec.name}: "
                f"got {header}, expected {list(spec.header)}"
            )
        return len(spec.header)
    for idx, name in spec.named_columns:
        got = header[idx] if -len(header) <= idx < len(header) else None
        if got != name:
            raise DataError(
                f"{path}, line 1: unexpected header for {spec.name}: column {idx} is {got!r}, "
                f"expected {name!r} (header: {header})"
            )
    return len(header)


def _parse_label(spec: GlueTask, path: Path, lineno: int, value: str) -> int | float:
    if spec.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise DataError(f"{path}, line {lineno}: score {value!r} is not a number") from None
        lo, hi = spec.score_range or (-math.inf, math.inf)
        if not (math.isfinite(score) and lo <= score <= hi):
            raise DataError(f"{path}, line {lineno}: score {value!r} outside the allowed range [{lo}, {hi}]")
        return score
    try:
        return spec.labels.index(value)
    except ValueError:
        raise DataError(
            f"{path}, line {lineno}: label {value!r} not in the label set {list(spec.labels)}"
        ) from None


def load_glue(task: str, data_dir: str | Path, split: str) -> list[Example]:
    """Load one labelled split of a GLUE task from its original TSV file.

    ``split`` is ``"train"`` or ``"dev"`` (MNLI: ``"train"``, ``"dev_matched"``, ``"dev_mismatched"``).
    ``data_dir`` is the GLUE root or the task folder. Labels become indices into ``GlueTask.labels``
    (STS-B: the float score). Any malformed input raises :class:`DataError`.
    """
    spec = get_glue_task(task)
    if split not in spec.splits:
        raise DataError(f"{spec.name} has no labelled split {split!r}; choose one of {list(spec.splits)}")
    path = _resolve_file(spec, Path(data_dir), split)

    rows = read_delimited(path, "\t", quoting=csv.QUOTE_NONE)
    num_fields = spec.num_fields
    if spec.header is not None or spec.named_columns:
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path}: file is empty; the {split} split has no examples")
        num_fields = _check_header(spec, path, first[1])
    assert num_fields is not None

    examples: list[Example] = []
    for lineno, row in rows:
        if len(row) != num_fields:
            raise DataError(
                f"{path}, line {lineno}: expected {num_fields} tab-separated fields, got {len(row)}"
            )
        pair = row[spec.text_pair_col] if spec.text_pair_col is not None else None
        label = _parse_label(spec, path, lineno, row[spec.label_col])
        examples.append(Example(text=row[spec.text_col], text_pair=pair, label=label))
    if not examples:
        raise DataError(f"{path}: the {split} split is empty (no data rows)")
    return examples
