"""`lorakit combine`: weighted combination of adapters into one adapter directory (``lorakit.arith.combine``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.arith.combine import MODES, SIGN_METHODS, combine_adapters
from lorakit.io.files import read_adapter


def combine_main(argv: list[str]) -> int:
    """``lorakit combine``: weighted combination of adapters into one adapter directory.

    Args:
        argv: the arguments after ``combine``.
    """
    parser = argparse.ArgumentParser(prog="lorakit combine", description="Combine weighted adapters into one "
                                     "(PEFT's add_weighted_adapter modes); writes an ordinary adapter directory.")
    parser.add_argument("adapters", nargs="+", type=Path, help="adapter directories")
    parser.add_argument("--out", required=True, type=Path, help="output adapter directory")
    parser.add_argument("--mode", required=True, choices=sorted(MODES), help="combination mode (PEFT's names)")
    parser.add_argument("--weights", type=lambda s: [float(w) for w in s.split(",")],
                        help="comma-separated weight per adapter (default 1 each)")  # fmt: skip
    parser.add_argument("--rank", type=int, help="target rank of the SVD modes (default: the largest input rank)")
    parser.add_argument("--density", type=float, help="fraction kept by ties / dare / magnitude_prune modes")
    parser.add_argument("--majority-sign", default="total", choices=SIGN_METHODS, help="TIES sign election")
    parser.add_argument("--clamp", type=float, help="SVD modes: clamp factors at this quantile")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks")
    parser.add_argument("--keep-extras-from", type=int, help="keep this input's (0-based) heads and biases")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier combine at --out (other files are kept)")
    args = parser.parse_args(argv)
    out = combine_adapters(args.adapters, args.weights, args.out, mode=args.mode, rank=args.rank,
                           density=args.density, majority_sign=args.majority_sign, clamp=args.clamp,
                           seed=args.seed, keep_extras_from=args.keep_extras_from,
                           overwrite=args.overwrite)  # fmt: skip
    combined = read_adapter(out)
    print(f"combined {len(args.adapters)} adapters ({args.mode}) → {out} (r={combined.config.r}, "
          f"{len(combined.pairs)} modules)")  # fmt: skip
    return 0
