"""`lorakit eval`: argument parsing and output; the scoring is ``lorakit.training.scoring``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorakit.cli.common import add_config_arguments, add_config_file, add_json, add_test_file_alias, format_metrics
from lorakit.errors import ConfigError
from lorakit.io.bases import adapter_base
from lorakit.training.coerce import read_config_file
from lorakit.training.config import json_safe, resolve_config
from lorakit.training.outputs import TRAIN_CONFIG
from lorakit.training.scoring import evaluate_model

# Fields `lorakit eval` accepts (the rest only matter for training).
EVAL_FIELDS = [
    "model", "task", "data", "max_length", "max_eval_samples", "split_seed", "eval_split", "eval_file",
    "train_file", "valid_file", "text_column", "text_pair_column", "label_column", "label_names",
    "eval_batch_size", "num_beams", "length_penalty", "no_repeat_ngram_size", "max_new_tokens",
    "device", "bf16", "seed", "prompt_field", "completion_field", "messages_field", "truncation",
    "format", "field_map", "chat_template",
    "beta", "pref_loss", "label_smoothing", "init_adapter",  # dpo/orpo: the loss and its reference
]  # fmt: skip



@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout, by Python or child processes (java), to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _eval_defaults(adapter: str | None) -> dict[str, Any]:
    """Settings a training run saved beside its adapter (task, data layout, labels, max length …)."""
    if adapter is None:
        return {}
    saved = Path(adapter) / TRAIN_CONFIG
    if not saved.is_file():
        # A checkpoint folder: the run's config is two levels up.
        saved = Path(adapter).parent.parent / TRAIN_CONFIG
    if saved.is_file():
        data = json.loads(saved.read_text())
    else:
        base = adapter_base(adapter)
        data = {"model": base} if base else {}
    return {k: v for k, v in data.items() if k in EVAL_FIELDS}


def eval_main(argv: list[str]) -> int:
    """``lorakit eval``: score a base model + adapter (or a merged model folder) on a task."""
    parser = argparse.ArgumentParser(
        prog="lorakit eval",
        description="Score a model on a task: a base model plus --adapter (a LoRA adapter or any trained "
        "state from `lorakit train`), or a merged model folder as --model. Settings default to the ones the "
        "adapter was trained with.",
    )
    parser.add_argument("--adapter", metavar="DIR", help="adapter / run directory from `lorakit train`")
    add_config_file(parser)
    add_json(parser, "print one JSON object metric -> value on stdout")
    parser.add_argument("--predictions", metavar="FILE", help="also write each prediction (JSON lines)")
    add_config_arguments(parser, only=EVAL_FIELDS)
    add_test_file_alias(parser)
    args = parser.parse_args(argv)

    data = _eval_defaults(args.adapter)
    if args.config:
        data.update({k.replace("-", "_"): v for k, v in read_config_file(args.config).items()})
    data.update({k: v for k, v in vars(args).items() if k in EVAL_FIELDS})
    if "model" not in data:
        raise ConfigError(
            "--model is required (the base model of the adapter, or a merged model folder); an adapter's "
            "base_model_name_or_path is used only when it is a built-in name or an absolute local folder"
        )
    cfg = resolve_config(None, data)

    redirect = _stdout_to_stderr() if args.json else _nothing()
    with redirect:
        metrics, predictions = evaluate_model(cfg, args.adapter)
        if args.predictions:
            with open(args.predictions, "w") as fh:
                for pred in predictions:
                    fh.write(json.dumps(pred) + "\n")
    if args.json:
        print(json.dumps(json_safe(metrics)))
    else:
        what = f"{cfg.model} + {args.adapter}" if args.adapter else cfg.model
        print(f"{cfg.task} ({what}):")
        print(format_metrics(metrics))
    return 0


@contextmanager
def _nothing() -> Iterator[None]:
    yield
