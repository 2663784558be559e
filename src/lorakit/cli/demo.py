"""`lorakit demo`: the flags; the demo itself is ``lorakit.demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit import demo
from lorakit.cli.common import add_seed


def demo_parser() -> argparse.ArgumentParser:
    """``lorakit demo``'s parser (the recipe search reuses its defaults)."""
    parser = argparse.ArgumentParser(prog="lorakit demo", description=demo.__doc__)
    parser.add_argument("--train-size", type=int, default=10000, help="sentiment training snippets")
    parser.add_argument("--test-size", type=int, default=800, help="held-out snippets per task")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    # The best lr measured for this one-epoch budget (docs/records/demo.md).
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--r", type=int, default=8)
    add_seed(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    return parser


def demo_main(argv: list[str]) -> int:
    """``lorakit demo``: see ``--help``.

    Args:
        argv: the arguments after ``lorakit demo``.
    """
    return demo.run_demo(demo.DemoSettings(**vars(demo_parser().parse_args(argv))))
