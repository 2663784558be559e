"""`lorakit classify`: the command over ``lorakit.classify`` (parsing, loading the adapters, printing the
metrics), the counterpart of `lorakit generate` for classification and regression heads."""

from __future__ import annotations

import argparse
import sys
import time

from lorakit.classify import Head, Settings, classify_file, load_classifier, read_head
from lorakit.cli.common import adapter_specs, add_adapters, add_device, add_model
from lorakit.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakit classify",
        description="Classify the rows of a CSV/TSV/JSONL file (with or without a label column) with a base "
        "model and one or more adapters trained by `lorakit train`. Rows name their adapter in an 'adapter' "
        "column (or use --default-adapter); all run in one mixed batch. Each output row keeps the input "
        "columns and adds 'prediction', 'prob_<label>' per class (regression: the score) and 'adapter'. With "
        "a label column, the metrics `lorakit eval` prints are printed per adapter.",
    )
    p.add_argument("input", help="CSV/TSV/JSONL file to classify")
    add_adapters(p, metavar="[NAME=]DIR", help_="adapter or run folder; repeat for several (rows name one in "
                 "'adapter'); at least one")
    add_model(p, help_="base model (default: the one the first adapter was trained on)")
    p.add_argument("--default-adapter", metavar="NAME", help="adapter of rows that name none")
    p.add_argument("--output", metavar="FILE",
                   help="CSV/TSV/JSONL to write (default: INPUT's name with .predictions before its suffix)")
    p.add_argument("--text-column", help="column of the text (default: the adapter's training setting)")
    p.add_argument("--text-pair-column", help="column of the second text, for pair tasks")
    p.add_argument("--label-column", help="column of the labels, if present (default: the training setting)")
    p.add_argument("--max-length", type=int, help="tokens per input (default: the training setting)")
    p.add_argument("--batch-size", type=int, default=32)
    add_device(p)
    return p  # fmt: skip


def _settings(args: argparse.Namespace, first: Head) -> Settings:
    """Flags over the first adapter's training settings over the defaults."""
    saved = first.settings

    def pick(flag: object, key: str, default: object) -> object:
        return flag if flag is not None else saved.get(key) if saved.get(key) is not None else default

    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        raise ConfigError("--batch-size and --max-length must be >= 1")
    return Settings(text_column=pick(args.text_column, "text_column", "text"),  # type: ignore[arg-type]
                    text_pair_column=pick(args.text_pair_column, "text_pair_column", None),  # type: ignore[arg-type]
                    label_column=pick(args.label_column, "label_column", "label"),  # type: ignore[arg-type]
                    max_length=pick(args.max_length, "max_length", 128),  # type: ignore[arg-type]
                    batch_size=args.batch_size, default=args.default_adapter)  # fmt: skip


def _print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    for name, values in metrics.items():
        print(f"{name}:")
        print("\n".join(f"  {k:<10}{v:.4f}" for k, v in values.items()))


def classify_main(argv: list[str]) -> int:
    """``lorakit classify``: see ``--help``."""
    from pathlib import Path

    args = _parser().parse_args(argv)
    if not args.adapter:
        raise ConfigError("give at least one --adapter: the base model's classifier head is untrained")
    heads = {name: read_head(name, path) for name, path in adapter_specs(args.adapter)}
    first = next(iter(heads.values()))
    model_name = args.model or first.settings.get("model")
    if not model_name:
        raise ConfigError("--model is required: the first adapter's folder holds no train_config.json naming it")
    if args.default_adapter is not None and args.default_adapter not in heads:
        raise ConfigError(f"--default-adapter {args.default_adapter!r} is not loaded; loaded: {list(heads)}")
    source = Path(args.input)
    if not source.is_file():
        raise ConfigError(f"{source}: file not found")
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.predictions{source.suffix}")
    cfg = _settings(args, first)
    model, tokenizer = load_classifier(model_name, list(heads.values()), args.device)
    started = time.perf_counter()
    result = classify_file(model, tokenizer, heads, source, output, cfg, progress=True)
    seconds = time.perf_counter() - started
    print(f"lorakit classify: {result.rows} rows -> {output} ({result.rows / max(seconds, 1e-9):.1f} rows/s)",
          file=sys.stderr)  # fmt: skip
    _print_metrics(result.metrics)
    return 0
