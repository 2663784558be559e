"""`lorakit train`: argument parsing only; the work is in ``lorakit.training.trainer``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lorakit.cli.common import add_config_arguments, add_config_file, add_test_file_alias, format_metrics
from lorakit.training.config import TrainConfig, resolve_config


def parse_train_args(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """``lorakit train``'s arguments: the resolved config (defaults < ``--config`` file < flags) and the rest.

    Args:
        argv: the arguments after ``lorakit train``.
    """
    parser = argparse.ArgumentParser(
        prog="lorakit train",
        description="Fine-tune a model on a task (GLUE, text classification or E2E) with LoRA or a baseline. "
        "Under torchrun (torchrun --nproc_per_node=N -m lorakit train ...) training is data-parallel.",
    )
    add_config_file(parser)
    add_config_arguments(parser)
    add_test_file_alias(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete a previous run's files in --out first"
    )
    parser.add_argument("--debug-kill-after-step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    return resolve_config(args.config, overrides), args


def train_main(argv: list[str]) -> int:
    """``lorakit train``: every TrainConfig field is a flag; ``--config`` reads a TOML/YAML file first."""
    cfg, args = parse_train_args(argv)
    from lorakit.training.trainer import train

    results = train(
        cfg, resume=args.resume, overwrite=args.overwrite, kill_after_step=args.debug_kill_after_step
    )
    if int(os.environ.get("RANK", "0")) == 0:
        from lorakit.training.selection import read_choice

        print(f"{cfg.task} {cfg.eval_split or 'eval'} results ({cfg.out}):")
        print(format_metrics(results))
        choice = read_choice(Path(cfg.out))
        if choice:
            print(choice)  # which step's adapter was published, and why
    return 0
