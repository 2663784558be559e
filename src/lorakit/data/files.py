"""Record readers for SFT data: JSONL, JSON arrays, CSV/TSV, Parquet and Arrow files, and folders written by
``datasets.save_to_disk``. Each yields ``(where, record)`` with ``where`` naming the file and line (or row), so
every later error points at the record; a record over ``MAX_RECORD_CHARS`` characters is refused there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.text import MAX_RECORD_CHARS, DataError, _records_from_jsonl, _records_from_table, record_too_long

__all__ = ["RECORD_SUFFIXES", "DiskSplit", "disk_splits", "is_saved_dataset", "read_records"]

RECORD_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".feather")
# datasets.save_to_disk split names -> lorakit's roles.
DISK_ROLES = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "test": "test"}


@dataclass(frozen=True)
class DiskSplit:
    """One split of a folder written by ``datasets.save_to_disk`` (``split`` None: a single Dataset)."""

    folder: Path
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.folder}[{self.split}]" if self.split else str(self.folder)


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``datasets.save_to_disk`` (a DatasetDict or a Dataset)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def disk_splits(folder: Path) -> dict[str, DiskSplit]:
    """Role -> split of a ``save_to_disk`` folder: a DatasetDict's train/validation/test splits, or a single
    Dataset as the train split.

    Args:
        folder: the folder.
    """
    if not (folder / "dataset_dict.json").is_file():
        return {"train": DiskSplit(folder)}
    try:
        names = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}/dataset_dict.json: not a datasets.save_to_disk index ({exc})") from exc
    unknown = [n for n in names if n not in DISK_ROLES]
    if unknown:
        raise DataError(f"{folder}: split(s) {unknown} have no role; name them train, validation or test")
    roles: dict[str, DiskSplit] = {}
    for name in names:
        if DISK_ROLES[name] in roles:
            raise DataError(f"{folder}: splits {roles[DISK_ROLES[name]].split!r} and {name!r} both mean "
                            f"{DISK_ROLES[name]}")  # fmt: skip
        roles[DISK_ROLES[name]] = DiskSplit(folder, name)
    return roles


def _size(value: Any) -> int:
    """Characters of text in a record (nested lists and objects included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(len(str(k)) + _size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 8


def _checked(rows: Iterator[dict[str, Any]], where: str, unit: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, rec in enumerate(rows, start=1):
        here = f"{where}, {unit} {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{here}: expected an object (a record), got {type(rec).__name__}")
        if _size(rec) > MAX_RECORD_CHARS:
            raise record_too_long(here)
        yield here, rec


def _json_array(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__} (JSONL: .jsonl)")
    return _checked(iter(data), str(path), "record")


def _arrow_table(path: Path) -> Any:
    try:
        import pyarrow.feather as feather
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: Parquet/Arrow files need pyarrow (pip install 'lorakit[data]')") from exc
    try:
        return pq.read_table(path) if path.suffix.lower() == ".parquet" else feather.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file; all mean "cannot read it"
        return _arrow_stream(path, exc)


def _arrow_stream(path: Path, first_error: Exception) -> Any:
    """An Arrow IPC stream (what ``datasets`` writes), tried when the file format fails."""
    import pyarrow as pa

    if path.suffix.lower() == ".parquet":
        raise DataError(f"{path}: not a readable Parquet file ({first_error})")
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except Exception as exc:
        raise DataError(f"{path}: not a readable Arrow file ({exc})") from exc


def _disk_rows(split: DiskSplit) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{split}: save_to_disk folders need datasets (pip install 'lorakit[data]')") from exc
    try:
        loaded = datasets.load_from_disk(str(split.folder))
    except Exception as exc:  # datasets raises FileNotFoundError or its own errors for a damaged folder
        raise DataError(f"{split.folder}: cannot be read by datasets.load_from_disk ({exc})") from exc
    return iter(loaded[split.split] if split.split else loaded)


def read_records(
    source: Path | DiskSplit, required_columns: Sequence[str] = ()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every record of an SFT source.

    Args:
        source: a file (by suffix: ``RECORD_SUFFIXES``) or a ``save_to_disk`` split.
        required_columns: CSV/TSV header columns that must be present.
    """
    if isinstance(source, DiskSplit):
        return _checked(_disk_rows(source), str(source), "row")
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return ((f"{source}, line {n}", rec) for n, rec in _records_from_jsonl(source))
    if suffix in (".csv", ".tsv"):
        rows = _records_from_table(source, "," if suffix == ".csv" else "\t", list(required_columns))
        return ((f"{source}, line {n}", rec) for n, rec in rows)
    if not source.is_file():
        raise DataError(f"{source}: file not found" if not source.exists() else f"{source}: not a regular file")
    if suffix == ".json":
        return _json_array(source)
    if suffix in (".parquet", ".arrow", ".feather"):
        return _checked(iter(_arrow_table(source).to_pylist()), str(source), "row")
    raise DataError(f"{source}: unsupported file type {suffix!r} (use one of {', '.join(RECORD_SUFFIXES)})")
