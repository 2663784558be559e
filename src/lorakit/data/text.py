"""Shared example type, the data error, and a loader for plain text-classification files.

Every loader here is strict: a malformed file raises :class:`DataError` naming the file, the line
and the problem instead of silently dropping rows, because a quietly shrunken dataset produces
plausible but wrong results.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError

__all__ = ["MAX_RECORD_CHARS", "DataError", "Example", "load_text_classification", "read_delimited", "record_too_long"]


class DataError(LorakitError, ValueError):
    """A data file is missing, unreadable or malformed (the message names the file and the line)."""


@dataclass(frozen=True)
class Example:
    """One classification/regression example: a text, an optional second text, and a label.

    ``label`` is the class index for classification and the float score for regression.
    """

    text: str
    text_pair: str | None
    label: int | float


def utf8_error(path: Path, exc: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8, naming the line and the byte offset in the whole file.

    A streaming decoder reports offsets within its current buffer, which deep in a file are wrong; the
    file is decoded once more here (only on this error path) to find the real position.

    Args:
        path: the file.
        exc: the decoder's error.
    """
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as real:
        line = data.count(b"\n", 0, real.start) + 1
        return DataError(f"{path}, line {line}: not valid UTF-8 text ({real.reason} at byte {real.start} of the file)")
    except OSError:
        pass
    return DataError(f"{path}: not valid UTF-8 text ({exc.reason})")


# The longest record a loader accepts, in characters: far above any training example, and low enough that
# a runaway line (a whole corpus on one line) is refused before it is held in memory or tokenized.
MAX_RECORD_CHARS = 1_000_000


def record_too_long(where: str) -> DataError:
    """The error for a record over ``MAX_RECORD_CHARS`` characters.

    Args:
        where: the file and line (or row) of the record.
    """
    return DataError(
        f"{where}: record longer than {MAX_RECORD_CHARS:,} characters; training examples are far shorter "
        "(a file with no line breaks, or a document to split into records?)"
    )


def _open_text(path: Path):
    """Open ``path`` for csv reading; ``utf-8-sig`` strips the BOM GLUE's MRPC files carry."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        return path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def read_delimited(path: str | Path, delimiter: str, *, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for every non-empty record of a CSV/TSV file; the line is where the
    record starts (a quoted field may span lines, and an unterminated quote runs to the end of the file).

    Decoding errors become :class:`DataError` with the file name. Blank lines are skipped.
    """
    path = Path(path)
    fh = _open_text(path)
    try:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise utf8_error(path, exc) from exc
            except csv.Error as exc:
                raise DataError(f"{path}, line {start}: malformed record ({exc})") from exc
            if not row or (len(row) == 1 and row[0] == ""):
                continue
            yield start, row
    finally:
        fh.close()


def _sort_label_names(values: Sequence[str]) -> list[str]:
    """Sort inferred label names numerically when they are all integers ("2" after "10" would be odd)."""
    uniq = set(values)
    try:
        return sorted(uniq, key=int)
    except ValueError:
        return sorted(uniq)


def _label_to_str(value: object) -> str:
    # JSON booleans would otherwise become "True"/"False" while a CSV holds "true"/"false"; a JSON number
    # that is a whole number is the same class as its integer text (1, 1.0 and "1" are one label).
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _label_kind(value: object) -> str:
    """``"boolean"`` for JSON true/false, else ``"value"``: the two may not share a file."""
    return "boolean" if isinstance(value, bool) else "value"


def _records_from_jsonl(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    fh = _open_text(path)
    try:
        lineno = 0
        while True:
            try:
                line = fh.readline(MAX_RECORD_CHARS + 1)  # a bounded read: a huge line never sits in memory
            except UnicodeDecodeError as exc:
                raise utf8_error(path, exc) from exc
            if line == "":
                return
            lineno += 1
            if len(line) > MAX_RECORD_CHARS:
                raise record_too_long(f"{path}, line {lineno}")
            if not line.strip():
                continue
            if line.startswith("\ufeff"):  # the file's own leading BOM is already gone (utf-8-sig)
                raise DataError(f"{path}, line {lineno}: a byte-order mark (U+FEFF) inside the file; were "
                                "files concatenated? Remove it")  # fmt: skip
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
    finally:
        fh.close()


def _records_from_table(
    path: Path, delimiter: str, required: Sequence[str]
) -> Iterator[tuple[int, dict[str, object]]]:
    # TSV is read without quote handling (like GLUE): quotes inside sentences are literal text.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = read_delimited(path, delimiter, quoting=quoting)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: file is empty (expected a header line)")
    _, header = first
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate column name(s) in header: {dupes}")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}, header: missing column(s) {missing}; available: {header}")
    for lineno, row in rows:
        if len(row) != len(header):
            spans = any("\n" in field for field in row)  # a quote left open swallows the lines after it
            raise DataError(
                f"{path}, line {lineno}: expected {len(header)} fields (header {header}), got {len(row)}"
                + ("; the record runs on over the next lines: an unterminated quote?" if spans else "")
            )
        yield lineno, dict(zip(header, row))


def load_text_classification(
    path: str | Path,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """Load a text-classification file (``.csv``, ``.tsv`` or ``.jsonl``) into examples.

    CSV/TSV need a header row naming the columns. Labels are matched by their string form against
    ``label_names``; when ``label_names`` is None they are inferred (sorted, numerically when all
    labels are integers). Returns ``(examples, label_names)`` with ``Example.label`` the index into
    ``label_names``.

    Args:
        path: the file; its suffix picks the format.
        text_column: the column (or JSON key) holding the text.
        text_pair_column: a second text column, for pair tasks.
        label_column: the column holding the label.
        label_names: the labels in index order (default: inferred from the file).
    """
    path = Path(path)
    columns = (text_column, text_pair_column, label_column)
    raw = _labelled_rows(path, _classification_records(path, [c for c in columns if c is not None]), columns)
    if label_names is None:
        names = _sort_label_names([r[3] for r in raw])
    else:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names):
            raise DataError(f"label_names contains duplicates: {names}")
    index = {n: i for i, n in enumerate(names)}
    examples = []
    for lineno, text, pair, label in raw:
        if label not in index:
            raise DataError(f"{path}, line {lineno}: label {label!r} is not one of {names}")
        examples.append(Example(text=text, text_pair=pair, label=index[label]))
    return examples, names


def _classification_records(path: Path, wanted: list[str]) -> Iterator[tuple[int, dict[str, object]]]:
    """(line, record) pairs of a ``.csv``, ``.tsv`` or ``.jsonl`` file; tables must have the ``wanted`` columns."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _records_from_table(path, ",", wanted)
    if suffix == ".tsv":
        return _records_from_table(path, "\t", wanted)
    if suffix in (".jsonl", ".ndjson"):
        return _records_from_jsonl(path)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")


def _labelled_rows(path: Path, records: Iterator[tuple[int, dict[str, object]]],
                   columns: tuple[str, str | None, str]) -> list[tuple[int, str, str | None, str]]:
    """(line, text, pair, label as text) of each record, checked: texts are text, labels present and of one kind."""
    text_column, text_pair_column, label_column = columns
    wanted = [c for c in columns if c is not None]
    raw: list[tuple[int, str, str | None, str]] = []
    kinds: dict[str, tuple[int, object]] = {}  # label kind -> its first (line, label)
    for lineno, rec in records:
        missing = [c for c in wanted if c not in rec]
        if missing:
            raise DataError(f"{path}, line {lineno}: missing key(s) {missing}; present: {sorted(rec)}")
        text, label = rec[text_column], rec[label_column]
        pair = rec[text_pair_column] if text_pair_column is not None else None
        for col, val in ((text_column, text), (text_pair_column, pair)):
            if col is not None and not isinstance(val, str):
                raise DataError(f"{path}, line {lineno}: column {col!r} must be text, got {val!r}")
        if label is None or _label_to_str(label) == "":
            raise DataError(f"{path}, line {lineno}: empty label in column {label_column!r}")
        kinds.setdefault(_label_kind(label), (lineno, label))
        if len(kinds) > 1:
            (_, (line_a, label_a)), (_, (line_b, label_b)) = kinds.items()
            raise DataError(
                f"{path}, line {line_b}: label {json.dumps(label_b)} mixes JSON booleans with numbers or text "
                f"(line {line_a} has {json.dumps(label_a)}); write every label the same way"
            )
        raw.append((lineno, text, pair, _label_to_str(label)))  # type: ignore[arg-type]
    if not raw:
        raise DataError(f"{path}: no examples (the file has no data rows)")
    return raw
