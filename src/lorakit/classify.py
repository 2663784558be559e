"""Classify the rows of a CSV/TSV/JSONL file with one base model and several classification adapters at once.

Each row goes through its own adapter (a per-row ``adapter`` column, or the default) in one mixed batch under
``lorakit.route_rows``, as ``lorakit serve`` does; every adapter brings its own head. The file is streamed in
chunks (bounded memory whatever its size); each output row keeps the input's columns and adds the predicted
label, the probability of every class (regression: the score) and the adapter used. When the file has the
label column, the metrics ``lorakit eval`` prints are computed per adapter.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data import DataError, Example
from lorakit.data.text import _records_from_jsonl, _records_from_table
from lorakit.errors import ConfigError
from lorakit.lora.adapters import route_rows
from lorakit.tasks import TaskSpec
from lorakit.tasks.glue import glue_spec

__all__ = ["Head", "classify_file", "load_classifier", "read_head"]

SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}
CHUNK_BATCHES = 8  # rows are sorted by length within a chunk of this many batches: less padding
PREDICTION, ADAPTER, PROB = "prediction", "adapter", "prob_"


@dataclass
class Head:
    """One adapter and what its head predicts, from the settings its training run saved."""

    name: str
    path: str
    spec: TaskSpec
    settings: dict[str, Any] = field(default_factory=dict)  # train_config.json fields (columns, max_length …)

    def label_index(self, value: object, where: str) -> int | float:
        """A label from the file as the metric code takes it (class index, or the score)."""
        if self.spec.kind == "regression":
            try:
                return float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DataError(f"{where}: label {value!r} is not a number") from None
        text = "true" if value is True else "false" if value is False else str(value).strip()
        if text not in self.spec.label_names:
            raise DataError(f"{where}: label {text!r} is not one of {self.name}'s {self.spec.label_names}")
        return self.spec.label_names.index(text)


def _run_settings(path: Path) -> dict[str, Any]:
    for saved in (path / "train_config.json", path.parent.parent / "train_config.json"):  # run or checkpoint
        if saved.is_file():
            return json.loads(saved.read_text(encoding="utf-8"))
    return {}


def read_head(name: str, path: str | Path) -> Head:
    """The head of the adapter in ``path``: its task, labels and columns from its run's ``train_config.json``
    (without one: labels ``0 .. K-1`` from the size of the saved head).

    Args:
        name: the adapter's name in the mixed batch.
        path: an adapter, run or checkpoint folder of ``lorakit train``.
    """
    from lorakit.data import glue_task_names
    from lorakit.io.files import read_adapter

    folder = Path(path)
    settings = _run_settings(folder)
    task = str(settings.get("task") or "text").lower()
    if task in glue_task_names():
        return Head(name, str(path), glue_spec(task), settings)
    labels = settings.get("label_names")
    if not labels:
        heads = [s["weight"] for s in read_adapter(folder).saved_modules.values() if "weight" in s]
        if not heads:
            raise ConfigError(f"--adapter {name}={path}: no classification head saved and no run settings")
        labels = [str(i) for i in range(heads[-1].shape[0])]
    spec = TaskSpec(task, "classification", "seq-cls", num_labels=len(labels), label_names=list(labels),
                    metric="text")  # fmt: skip
    return Head(name, str(path), spec, settings)


def load_classifier(model_name: str, heads: Sequence[Head], device: str = "auto") -> tuple[nn.Module, Any]:
    """(model, tokenizer): the base as a sequence classifier with every head's adapter loaded, unmerged.

    Args:
        model_name: built-in name, local folder or hub id of the base.
        heads: the adapters (all with heads of one size: they share the base's classifier shape).
        device: auto, cpu or cuda.
    """
    from lorakit.io.files import load_adapter
    from lorakit.io.models import load_model
    from lorakit.training.distributed import pick_device

    sizes = {h.name: h.spec.num_labels for h in heads}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"the adapters' heads differ in size ({sizes}); classify them in separate runs")
    model, tokenizer = load_model(model_name, "seq-cls", num_labels=next(iter(sizes.values())))
    for head in heads:
        load_adapter(model, head.path, name=head.name, activate=False)
    return model.to(pick_device(device)).eval(), tokenizer


def read_rows(path: str | Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, record)`` for each row of a CSV/TSV (header line) or JSONL file, streamed.

    Args:
        path: the file.
        required: columns every row must have.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")
    delimiter = SUFFIXES[suffix]
    rows = _records_from_table(path, delimiter, required) if delimiter else _records_from_jsonl(path)
    for lineno, rec in rows:
        missing = [c for c in required if c not in rec]
        if missing:
            raise DataError(f"{path}, line {lineno}: missing column(s) {missing}; present: {sorted(rec)}")
        yield lineno, rec


@dataclass
class Settings:
    """How ``classify_file`` reads the input and batches it."""

    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    batch_size: int = 32
    default: str | None = None  # the adapter of rows without an ``adapter`` value (None: the only one)


@dataclass
class Result:
    """What ``classify_file`` did: rows written, and per adapter the metrics when labels were present."""

    rows: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    scored: dict[str, tuple[list[Any], list[Any]]] = field(default_factory=dict)  # adapter -> (preds, labels)


def _route(rec: dict[str, Any], heads: dict[str, Head], default: str | None, where: str) -> str:
    name = rec.get(ADAPTER) or default
    if name is None:
        raise ConfigError(f"{where}: several adapters are loaded; name one in the 'adapter' column "
                          "(or --default-adapter)")  # fmt: skip
    if name not in heads:
        raise ConfigError(f"{where}: unknown adapter {name!r}; loaded: {list(heads)}")
    return str(name)


@torch.no_grad()
def _logits(model: nn.Module, tokenizer: Any, chunk: list[dict[str, Any]], cfg: Settings) -> list[torch.Tensor]:
    """Each row's logits, batches cut from the chunk sorted by length; row i through ``chunk[i]['_route']``."""
    texts = [str(r[cfg.text_column]) for r in chunk]
    pairs = [str(r[cfg.text_pair_column]) for r in chunk] if cfg.text_pair_column else None
    enc = tokenizer(texts, text_pair=pairs, truncation=True, max_length=cfg.max_length)
    order = sorted(range(len(chunk)), key=lambda i: len(enc["input_ids"][i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(chunk)
    device = next(model.parameters()).device
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
        with route_rows(model, [chunk[i]["_route"] for i in idx]):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        for i, row in zip(idx, logits):
            out[i] = row
    return out


def _output_row(rec: dict[str, Any], logits: torch.Tensor, head: Head, columns: list[str]) -> dict[str, Any]:
    row = {k: v for k, v in rec.items() if k != "_route"}
    if head.spec.kind == "regression":
        row[PREDICTION] = round(head.spec.unscale_prediction(float(logits[0])), 6)
    else:
        probs = torch.softmax(logits, -1).tolist()
        row[PREDICTION] = head.spec.label_names[int(torch.argmax(logits))]
        for name, p in zip(head.spec.label_names, probs):
            row[f"{PROB}{name}"] = round(p, 6)
    row[ADAPTER] = rec["_route"]
    return {c: row.get(c, "") for c in columns} if columns else row


class _Writer:
    """Rows to CSV/TSV (a header from the first row's columns) or JSONL, under a temporary name renamed into
    place at the end, so a stopped run leaves no half-written file under the output's name."""

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise ConfigError(f"--output {path}: use a .csv, .tsv or .jsonl name")
        self.path, self.delimiter = path, SUFFIXES[suffix]
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.fh = open(self.tmp, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
        self.table: csv.DictWriter | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self.delimiter is None:
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        if self.table is None:
            self.table = csv.DictWriter(self.fh, fieldnames=list(row), delimiter=self.delimiter)
            self.table.writeheader()
        self.table.writerow(row)

    def close(self, keep: bool) -> None:
        from lorakit.io.fsutil import file_mode

        self.fh.close()
        if keep:
            os.chmod(self.tmp, file_mode())
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _columns(first: dict[str, Any], heads: dict[str, Head], table: bool) -> list[str]:
    """Output columns: the input's, the prediction, one probability per class (union over heads), the adapter.
    JSONL rows keep their own keys (an empty list)."""
    clash = [c for c in first if c == PREDICTION or c.startswith(PROB)]
    if clash:
        raise DataError(f"the input already has column(s) {clash}, which classify writes; rename them")
    if not table:
        return []
    probs = [f"{PROB}{n}" for h in heads.values() if h.spec.kind != "regression" for n in h.spec.label_names]
    return [c for c in first if c not in (ADAPTER, "_route")] + [PREDICTION, *dict.fromkeys(probs), ADAPTER]


def _score(result: Result, heads: dict[str, Head]) -> None:
    from lorakit.metrics.registry import get_metric

    for name, (preds, golds) in result.scored.items():
        spec = heads[name].spec
        items = [Example("", None, g) for g in golds]
        scores = get_metric(spec.metric)(preds, items, spec)
        result.metrics[name] = {k: float("nan") if v is None else float(v) for k, v in scores.items()}


def classify_file(model: nn.Module, tokenizer: Any, heads: dict[str, Head], source: str | Path,
                  output: str | Path, cfg: Settings, progress: bool = False) -> Result:  # fmt: skip
    """Classify every row of ``source`` into ``output`` (see the module docstring); returns the row count and,
    when ``source`` has ``cfg.label_column``, each adapter's metrics as ``lorakit eval`` computes them.

    Args:
        model / tokenizer: from ``load_classifier``.
        heads: name -> head of every loaded adapter.
        source: CSV/TSV/JSONL input (streamed).
        output: CSV/TSV/JSONL output (written under a temporary name, renamed at the end).
        cfg: columns, max length, batch size and the default adapter.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    required = [c for c in (cfg.text_column, cfg.text_pair_column) if c]
    total = sum(1 for _ in read_rows(source, required))  # a cheap first pass: the bar's total, errors early
    default = cfg.default or (next(iter(heads)) if len(heads) == 1 else None)
    writer, result, chunk, columns = _Writer(Path(output)), Result(), [], None
    bar = tqdm(total=total, desc="classify", unit="row", disable=not progress)
    try:
        for lineno, rec in read_rows(source, required):
            rec["_route"] = _route(rec, heads, default, f"{source}, line {lineno}")
            if columns is None:
                columns = _columns(rec, heads, writer.delimiter is not None)
            chunk.append((lineno, rec))
            if len(chunk) == cfg.batch_size * CHUNK_BATCHES:
                _flush(model, tokenizer, heads, chunk, cfg, writer, result, columns, source)
                bar.update(len(chunk))
                chunk = []
        _flush(model, tokenizer, heads, chunk, cfg, writer, result, columns or [], source)
        bar.update(len(chunk))
    except BaseException:
        writer.close(keep=False)
        raise
    finally:
        bar.close()
    writer.close(keep=True)
    _score(result, heads)
    return result


def _flush(model: nn.Module, tokenizer: Any, heads: dict[str, Head], chunk: list[tuple[int, dict[str, Any]]],
           cfg: Settings, writer: _Writer, result: Result, columns: list[str], source: str | Path) -> None:  # fmt: skip
    """Classify one chunk, write its rows in file order, and keep (prediction, label) for the metrics."""
    if not chunk:
        return
    records = [rec for _, rec in chunk]
    for (lineno, rec), logits in zip(chunk, _logits(model, tokenizer, records, cfg)):
        head = heads[rec["_route"]]
        row = _output_row(rec, logits, head, columns)
        writer.write(row)
        result.rows += 1
        if cfg.label_column in rec and rec[cfg.label_column] not in (None, ""):
            gold = head.label_index(rec[cfg.label_column], f"{source}, line {lineno}")
            regression = head.spec.kind == "regression"
            pred = head.spec.unscale_prediction(float(logits[0])) if regression else int(torch.argmax(logits))
            preds, golds = result.scored.setdefault(head.name, ([], []))
            preds.append(pred)
            golds.append(gold)
