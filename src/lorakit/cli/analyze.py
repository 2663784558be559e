"""`lorakit analyze`: the flags and the output; the analysis is ``lorakit.analysis.subspace``."""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.analysis import subspace
from lorakit.cli.common import add_json, add_model, add_seed


def layer_list(text: str | None) -> list[int] | None:
    """``"0,5,10-12"`` → ``[0, 5, 10, 11, 12]``; None or empty: every layer.

    Args:
        text: the ``--layers`` value.
    """
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def analyze_main(argv: list[str]) -> int:
    """``lorakit analyze ADAPTER [ADAPTER2 ...] [--model MODEL] [--out DIR] [--layers ...] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="lorakit analyze",
        description="Spectra of ΔW, subspace similarity between adapters, and ΔW versus W (LoRA paper §7).",
    )
    parser.add_argument("adapters", nargs="+", help="adapter directories (PEFT layout)")
    add_model(parser, help_="base model (name or path) for the ΔW-vs-W comparison")
    parser.add_argument("--task", default="causal-lm", help="task passed to lorakit.io.models.load_model")
    parser.add_argument("--out", help="directory for analysis.json and PNG figures")
    parser.add_argument("--layers", help="layer indices to keep, e.g. 0,5,10-12")
    parser.add_argument("--draws", type=int, default=5, help="random draws for the baselines")
    add_seed(parser)
    parser.add_argument("--no-plots", action="store_true")
    add_json(parser, "print the full result as JSON")
    args = parser.parse_args(argv)
    errors: tuple[type[Exception], ...] = (ValueError, OSError, KeyError)
    try:
        from lorakit.errors import LorakitError

        errors = (*errors, LorakitError)
    except ImportError:  # the analysis does not need the core package
        pass
    try:
        weights = subspace.model_weights(args.model, args.task) if args.model else None
        result = subspace.analyze_adapters(
            args.adapters,
            weights,
            args.out,
            layers=layer_list(args.layers),
            draws=args.draws,
            seed=args.seed,
            plots=not args.no_plots,
        )
    except errors as exc:
        print(f"lorakit analyze: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(subspace.json_safe(result), indent=1) if args.json else subspace.format_analysis(result))
    return 0
