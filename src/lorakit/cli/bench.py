"""``lorakit bench``: run the suite case by case (one subprocess each), then write a table, JSON and a plot.

lorakit bench                      # default suite, ~10 min on an idle 2-core CPU
lorakit bench --quick              # tiny smoke configuration, ~2 min
lorakit bench --cases pair,infer   # sections (train, pair, infer, mixed, merge, switch) or id substrings
lorakit bench --scaling            # also the model-size / rank sweep and its PNG (slow)
lorakit bench --render runs/bench/bench.json   # rebuild table and plot from saved results
lorakit bench serve                # load test of `lorakit serve` (lorakit.bench.serve_load)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from lorakit.bench import serve_load, session
from lorakit.bench.llama_cpp import default_server_path
from lorakit.cli.common import add_device, add_threads


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakit bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (every kind once)")
    p.add_argument("--cases", default="", help="comma-separated sections or id substrings to run")
    p.add_argument("--scaling", action="store_true", help="add the model-size and rank sweep (slow) and its plot")
    add_device(p, default="cpu", help_="cpu, cuda, or auto")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md and scaling.png")
    p.add_argument("--repeats", type=int, default=0, help="override timed repeats per case")
    p.add_argument("--warmup", type=int, default=-1, help="override warm-up runs per case")
    add_threads(p, default=0, help_="torch threads per case (0: torch's default)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a case is abandoned")
    p.add_argument("--list", action="store_true", help="print the selected case ids and exit")
    p.add_argument(
        "--render",
        metavar="JSON",
        nargs="+",
        help="only re-render the table and plot from bench.json files (results are merged)",
    )
    return p


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit bench serve", description=serve_load.__doc__.split("\n\n")[0])
    p.add_argument("--adapters", default="1,8,32", help="distinct adapters per run (comma list)")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop clients (comma list)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="requests per client in each cell")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each batched cell and of (b); tables report the median (0.1 of noise is common)")
    p.add_argument("--baseline-requests", type=int, default=16, help="requests for baselines (a) and (b)")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[4] / "shared/data/e2e/valid.txt")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--no-peft", action="store_true", help="skip baseline (b)")
    p.add_argument("--no-batching-off", action="store_true", help="skip baseline (a), the server one request at a time")
    p.add_argument("--no-server-variants", action="store_true",
                   help="skip baselines (c) prefill one request at a time and (d) plain fp32 weights")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's llama-server side")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="llama-server binary (default: the one scripts/llama_cpp.sh built, in its cache)")
    p.add_argument("--llama-threads", type=int, default=2, help="llama-server's CPU threads (-t)")
    p.add_argument("--pairs", type=int, default=0,
                   help="then run lorakit serve and llama.cpp's F32 side together, alternating this many pairs of "
                        "one-adapter cells (drift in the machine hits both alike)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_serve"))
    return p


def bench_main(argv: list[str] | None = None) -> int:
    """``lorakit bench`` (and ``lorakit bench serve``): see ``--help``.

    Args:
        argv: the arguments after ``lorakit bench``.
    """
    if argv and argv[0] == "serve":  # `lorakit bench serve`: the server load generator
        args = _serve_parser().parse_args(argv[1:])
        args.llama_server = args.llama_server or default_server_path()
        return serve_load.run_serve_bench(args, argv[1:])
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if args.render:
        return session.write_report(session.merge_reports([json.loads(Path(p).read_text()) for p in args.render]), out)
    device = session.resolve_device(args.device)
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    cases = session.pick_cases(device, patterns, quick=args.quick, scaling=args.scaling, repeats=args.repeats,
                               warmup=args.warmup, threads=args.threads)  # fmt: skip
    if args.list:
        print("\n".join(c.id for c in cases))
        return 0
    if not cases:
        print("lorakit bench: no case matches --cases", file=sys.stderr)
        return 2
    command = "lorakit bench " + shlex.join(argv if argv is not None else sys.argv[2:])
    report = session.run_cases(cases, device, command, args.timeout)
    code = session.write_report(report, out)
    return code or (1 if any("error" in r for r in report["results"]) else 0)
