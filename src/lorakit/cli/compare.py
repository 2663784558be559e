"""`lorakit compare`: the flags; the runs, table and plot are ``lorakit.experiments.compare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lorakit.cli.common import add_config_arguments, add_config_file, int_list
from lorakit.experiments import compare
from lorakit.training.coerce import read_config_file


def compare_main(argv: list[str]) -> int:
    """``lorakit compare``: see ``--help``.

    Args:
        argv: the arguments after ``lorakit compare``.
    """
    parser = argparse.ArgumentParser(prog="lorakit compare", description=compare.__doc__.split("\n\n")[0],
                                     epilog="Every other flag is a training setting, passed to each run.")
    parser.add_argument("--methods", default="", help="comma-separated method specs (no ',' inside a spec)")
    parser.add_argument("--method", action="append", default=[], metavar="SPEC",
                        help="one method spec NAME[:key=value...] (repeatable; may contain commas)")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated seeds")
    parser.add_argument("--out", default="runs/compare", help="directory for every run and the outputs")
    parser.add_argument("--overwrite", action="store_true", help="retrain runs that already have results")
    parser.add_argument("--spread", choices=compare.SPREADS, default="std", help="spread over seeds shown after ±")
    parser.add_argument("--metrics", default=None, help="comma-separated table metrics (default: all)")
    parser.add_argument("--plot-metric", default=None, help="the plot's y metric (default: the first)")
    add_config_file(parser, "TOML/YAML file of training settings for every run")
    fields = [f for f in compare.train_fields() if f not in compare.CONTROLLED]
    add_config_arguments(parser, only=fields)
    args = parser.parse_args(argv)

    texts = [t for t in args.methods.split(",") if t.strip()] + args.method
    if not texts:
        parser.error("name at least one method: --methods lora,adapter_h,bitfit or --method SPEC")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    specs = [compare.parse_spec(t, fields) for t in texts]
    base: dict[str, Any] = {}
    if args.config:
        base.update({k.replace("-", "_"): v for k, v in read_config_file(args.config).items()})
    base.update({k: v for k, v in vars(args).items() if k in fields})
    for key in compare.CONTROLLED:
        base.pop(key, None)
    records = compare.run_compare(specs, args.seeds, base, args.out, overwrite=args.overwrite,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    title = f"{records[0]['model']} · {records[0]['task']}" if records else ""
    print(compare.write_outputs(records, Path(args.out), spread=args.spread, metrics=metrics,
                        plot_metric=args.plot_metric, title=title))
    return 1 if all(r["status"] == "failed" for r in records) else 0
