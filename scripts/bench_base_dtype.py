"""SmolLM2 with its frozen base in fp32 against bf16 (--base-dtype), side by side in one run.

Each run trains in its own process (peak RSS is a process's), fp32 and bf16 alternating, for ``--seeds``
data orders (seed 0, 1, ...), repeated ``--rounds`` times. Each run prints its peak RSS, median step time
(steps after the first two) and held-out (validation) loss after training; the summary gives the bf16 / fp32
ratios of the medians, bf16's loss minus fp32's at each seed, and the spread of fp32's loss over the seeds
(how far the data order alone moves it).

    python scripts/bench_base_dtype.py --data ../shared/data/e2e [--steps 12] [--seeds 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One training run in this process; prints one JSON line."""
    from lorakit.training.config import TrainConfig
    from lorakit.training.trainer import train

    out = Path(args.out)
    cfg = TrainConfig(
        model="smollm2-135m", task="e2e", data=args.data, out=str(out), base_dtype=args.dtype, seed=args.seed,
        max_steps=args.steps, batch_size=args.batch_size, max_length=96, max_train_samples=400,
        max_valid_samples=args.valid,
        max_eval_samples=1, num_beams=1, max_new_tokens=4, eval_interval=0, log_interval=1, plot=False,
        keep="last",
    )  # fmt: skip
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records if r["split"] == "train"]
    steps = [b - a for a, b in itertools.pairwise(elapsed)][1:]  # the first steps warm up
    valid = [r for r in records if r["split"] == "valid"][-1]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"dtype": args.dtype, "seed": args.seed, "peak_rss_mib": round(peak_mib, 1),
                      "step_s": statistics.median(steps), "valid_loss": valid["loss"]}))  # fmt: skip


def _runs(args: argparse.Namespace, tmp: str) -> list[dict]:
    """Every (round, seed, dtype) run, each in its own process, fp32 and bf16 alternating."""
    results = []
    for r in range(args.rounds):
        for seed in range(args.seeds):
            for dtype in ("fp32", "bf16"):
                cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--seed", str(seed), "--data",
                       args.data, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--valid",
                       str(args.valid), "--out", f"{tmp}/{dtype}-{seed}-{r}"]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    return results


def summary(results: list[dict]) -> dict:
    """The bf16 / fp32 ratios over all runs and the held-out loss against the spread of data orders.

    Args:
        results: the child runs' JSON lines.
    """
    med = {d: {m: statistics.median(x[m] for x in results if x["dtype"] == d) for m in ("peak_rss_mib", "step_s")}
           for d in ("fp32", "bf16")}  # fmt: skip
    loss = {(x["dtype"], x["seed"]): x["valid_loss"] for x in results}
    fp32_losses = [v for (d, _), v in loss.items() if d == "fp32"]
    seeds = sorted({s for _, s in loss})
    return {
        "peak_rss_mib": med, "rss_ratio": med["bf16"]["peak_rss_mib"] / med["fp32"]["peak_rss_mib"],
        "step_ratio": med["bf16"]["step_s"] / med["fp32"]["step_s"],
        "bf16_minus_fp32_loss_per_seed": {s: loss[("bf16", s)] - loss[("fp32", s)] for s in seeds},
        "fp32_loss_spread_over_seeds": max(fp32_losses) - min(fp32_losses),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/e2e")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=2, help="data orders, each trained in fp32 and in bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--valid", type=int, default=64, help="validation (MR, reference) pairs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-base-dtype-") as tmp:
        results = _runs(args, tmp)
    print(json.dumps(summary(results), indent=1))


if __name__ == "__main__":
    main()
