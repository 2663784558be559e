"""`lorakit estimate`: the flags and the output; the arithmetic is ``lorakit.analysis.estimate``."""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.analysis.arch_spec import PRESETS
from lorakit.analysis.estimate import PRECISIONS, estimate, format_estimate
from lorakit.cli.common import add_json


def estimate_main(argv: list[str]) -> int:
    """``lorakit estimate MODEL_OR_CONFIG [...]``; returns a process exit code."""
    parser = argparse.ArgumentParser(
        prog="lorakit estimate",
        description="Trainable parameters, adapter size and Adam training memory: LoRA vs full fine-tuning.",
    )
    parser.add_argument("model", nargs="?", help="preset name, config.json or model folder")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--targets", default="q,v", help="comma list of q,k,v,o,ffn (or attn, all)")
    parser.add_argument("--r", default="8", help="rank, or per target: q=8,v=4")
    parser.add_argument("--batch", type=int, help="batch size (with --seq: adds an activation estimate)")
    parser.add_argument("--seq", type=int, help="sequence length")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    add_json(parser)
    parser.add_argument("--list-presets", action="store_true", help="list built-in architectures and exit")
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, spec in PRESETS.items():
            print(f"{name:<14} {spec.family:<11} {spec.layers:>3} layers  d={spec.hidden}")
        return 0
    if args.model is None:
        parser.print_usage(sys.stderr)
        print("lorakit estimate: error: MODEL_OR_CONFIG is required", file=sys.stderr)
        return 2
    try:
        est = estimate(
            args.model,
            method=args.method,
            targets=args.targets,
            r=args.r,
            batch=args.batch,
            seq=args.seq,
            precision=args.precision,
        )
    except (ValueError, OSError) as exc:
        print(f"lorakit estimate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_estimate(est))
    return 0
