"""`lorakit data inspect`: the first records as the model will see them, with the trained (loss) tokens
marked, and length statistics, before any training time is spent (axolotl's ``preprocess --debug``)."""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lorakit.cli.common import add_config_arguments, add_config_file
from lorakit.errors import ConfigError
from lorakit.lora.kernels import IGNORE_INDEX
from lorakit.training.config import TrainConfig, resolve_config

# The TrainConfig fields that decide what the model sees.
INSPECT_FIELDS = [
    "model", "task", "data", "train_file", "valid_file", "eval_file", "max_length", "truncation", "format",
    "field_map", "chat_template", "prompt_field", "completion_field", "messages_field", "split_seed",
    "max_train_samples",
]  # fmt: skip
MARKS = {False: ("[[", "]]"), True: ("\x1b[1;32m", "\x1b[0m")}  # trained text: brackets, or green on a terminal


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakit data inspect",
        description="Show the first training records as the model sees them, trained (loss) tokens marked "
        "([[...]], green on a terminal), and token-length statistics over the whole training split.",
    )
    add_config_file(p, help_="TOML/YAML file of training fields; flags override it")
    add_config_arguments(p, only=INSPECT_FIELDS)
    p.add_argument("-n", "--records", type=int, default=3, help="records to show (default: 3)")
    p.add_argument("--tokens", action="store_true", help="one line per token (id, text, * where trained)")
    return p


def _spans(tokenizer: Any, row: dict[str, Any], color: bool) -> str:
    """The row's text with each run of trained tokens wrapped in marks."""
    open_, close = MARKS[color]
    out, run, trained = [], [], False
    for token, label in [*zip(row["input_ids"], row["labels"]), (None, None)]:
        now = label is not None and label != IGNORE_INDEX
        if now != trained or token is None:
            text = tokenizer.decode(run)
            out.append(f"{open_}{text}{close}" if trained and text else text)
            run, trained = [], now
        if token is not None:
            run.append(token)
    return "".join(out)


def _token_lines(tokenizer: Any, row: dict[str, Any]) -> str:
    return "\n".join(f"{i:>5} {t:>7} {'*' if label != IGNORE_INDEX else ' '} {tokenizer.decode([t])!r}"
                     for i, (t, label) in enumerate(zip(row["input_ids"], row["labels"])))  # fmt: skip


def length_stats(rows: Sequence[dict[str, Any]], full_lengths: Sequence[int], max_length: int) -> str:
    """Tokens per record, the share cut to fit ``max_length`` and the share of tokens trained.

    Args:
        rows: encoded rows as training sees them.
        full_lengths: each row's length before any cut.
        max_length: the run's limit.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    trained = sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows)
    cut = sum(1 for n in full_lengths if n > max_length)
    return (
        f"{len(rows)} records; tokens per record: min {min(lengths)}, median {statistics.median(lengths):g}, "
        f"mean {statistics.fmean(lengths):.1f}, max {max(lengths)} (max_length {max_length}); cut to fit: "
        f"{cut} ({100 * cut / len(rows):.1f}%); trained tokens: {trained} of {sum(lengths)} "
        f"({100 * trained / max(1, sum(lengths)):.1f}%)"
    )


def _encoded(cfg: TrainConfig) -> tuple[Any, list[dict[str, Any]], list[int], list[str], TrainConfig]:
    from lorakit.data.chat_templates import apply_chat_template, read_chat_template
    from lorakit.io.models import load_tokenizer, model_path
    from lorakit.tasks import load_task
    from lorakit.training.defaults import resolve_task_defaults
    from lorakit.training.evaluate import encode

    data = load_task(cfg, roles=("train",))
    if data.spec.kind != "generation":
        raise ConfigError(f"data inspect shows causal-LM tasks (sft, e2e, webnlg, dart), not {data.spec.name!r}")
    cfg = resolve_task_defaults(cfg, data.spec.kind, data.spec.recipe)
    tokenizer = load_tokenizer(model_path(cfg.model))
    if cfg.chat_template:
        apply_chat_template(tokenizer, read_chat_template(cfg.chat_template))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = encode(data.spec, data.train, tokenizer, cfg.max_length, cfg.truncation)
        full = encode(data.spec, data.train, tokenizer, 10**9, "left")
    notes = [*data.notes, *(str(w.message) for w in caught if "cut" in str(w.message))]
    return tokenizer, rows, [len(r["input_ids"]) for r in full], notes, cfg


def inspect_main(argv: list[str]) -> int:
    """``lorakit data inspect``: see ``--help``."""
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    cfg = resolve_config(args.config, overrides)
    tokenizer, rows, full, notes, cfg = _encoded(cfg)
    color = sys.stdout.isatty()
    for note in notes:
        print(f"note: {note}")
    for i, row in enumerate(rows[: max(0, args.records)]):
        print(f"--- record {i + 1} of {len(rows)}: {len(row['input_ids'])} tokens ---")
        print(_token_lines(tokenizer, row) if args.tokens else _spans(tokenizer, row, color))
    print(f"--- {length_stats(rows, full, cfg.max_length)}")  # type: ignore[arg-type]
    return 0


def data_main(argv: list[str]) -> int:
    """``lorakit data SUBCOMMAND``: ``inspect``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lorakit data inspect [ARGS...]\n\n  inspect   show records as the model sees them, loss "
              "tokens marked, with length statistics")  # fmt: skip
        return 0
    if argv[0] != "inspect":
        raise ConfigError(f"unknown data command {argv[0]!r}; expected 'inspect'")
    return inspect_main(argv[1:])
