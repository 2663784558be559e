"""`lorakit latency`: the flags and the table; the measurement is ``lorakit.experiments.latency``."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lorakit.cli.common import add_device, add_json, add_model, add_threads, positive_int_list
from lorakit.experiments import latency


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit latency", description=latency.__doc__.split("\n\n")[0])
    add_model(parser, default="smollm2-135m",
              help_=f"built-in name, folder or hub id; or {', '.join(latency.RANDOM_MODELS)} (random)")
    parser.add_argument("--variants", default=",".join(latency.DEFAULT_VARIANTS),
                        help="comma-separated: base, lora_merged, lora_unmerged, or any method name")
    parser.add_argument("--batch-sizes", type=positive_int_list, default=[1, 4, 16])
    parser.add_argument("--seq-lens", type=positive_int_list, default=[128, 512])
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per variant and shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per variant and shape first")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--targets", default="q,v", help="LoRA targets")
    parser.add_argument("--bottleneck", type=int, default=16, help="adapter bottleneck size")
    parser.add_argument("--prefix-length", type=int, default=10, help="prefix_layer / prefix_embed length")
    add_device(parser, default="cpu", help_="cpu or cuda")
    add_threads(parser, help_="torch CPU threads (default: torch's)")
    parser.add_argument("--full-logits", action="store_true", help="compute logits at every position")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="table statistic over repeats (min: least disturbed by other jobs)")
    add_json(parser, "print the full report as JSON, not a table")
    return parser


def latency_main(argv: list[str]) -> int:
    """``lorakit latency``: see ``--help``.

    Args:
        argv: the arguments after ``lorakit latency``.
    """
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    report = latency.run_latency(
        args.model, variants, args.batch_sizes, args.seq_lens,
        repeats=args.repeats, warmup=args.warmup, r=args.r, targets=args.targets, bottleneck=args.bottleneck,
        prefix=args.prefix_length, device=args.device, full_logits=args.full_logits,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        load = report["load_average_before"]
        print(f"Forward latency, {report['model']} on {report['device']} ({report['threads']} threads), "
              f"{args.stat} of {report['repeats']} after {report['warmup']} warm-up; load average: {load}\n")
        print(latency.format_table(report, args.stat))
    return 0
