"""SmolLM2 with its frozen base in fp32 against bf16 (--base-dtype), side by side in one run.

Each setting trains in its own process (peak RSS is a process's), interleaved: fp32 seed 0, bf16 seed 0,
fp32 seed 1 (another data order: the shuffle spread the held-out loss is judged against), repeated
``--rounds`` times. Reports each run's peak RSS, median step time (steps after the first two) and the
held-out (validation) loss after training, then the bf16 / fp32 ratios.

    python scripts/bench_base_dtype.py --data ../shared/data/e2e [--steps 12] [--rounds 1] [--batch-size 8]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/e2e")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1)
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
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-base-dtype-") as tmp:
        for r in range(args.rounds):
            for dtype, seed in (("fp32", 0), ("bf16", 0), ("fp32", 1)):
                cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--seed", str(seed), "--data",
                       args.data, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--valid",
                       str(args.valid), "--out", f"{tmp}/{dtype}-{seed}-{r}"]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    by = {(d, s): [x for x in results if x["dtype"] == d and x["seed"] == s] for d, s in (("fp32", 0), ("bf16", 0),
                                                                                       ("fp32", 1))}  # fmt: skip
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_rss_mib", "step_s", "valid_loss")}
           for k, v in by.items()}  # fmt: skip
    fp32, bf16, other = med[("fp32", 0)], med[("bf16", 0)], med[("fp32", 1)]
    print(f"peak RSS  fp32 {fp32['peak_rss_mib']:.0f} MiB, bf16 {bf16['peak_rss_mib']:.0f} MiB "
          f"({bf16['peak_rss_mib'] / fp32['peak_rss_mib']:.2f}x)")
    ratio = bf16["step_s"] / fp32["step_s"]
    print(f"step time fp32 {fp32['step_s']:.2f} s, bf16 {bf16['step_s']:.2f} s ({ratio:.2f}x)")
    print(f"valid loss fp32 {fp32['valid_loss']:.4f}, bf16 {bf16['valid_loss']:.4f} (|diff| "
          f"{abs(bf16['valid_loss'] - fp32['valid_loss']):.4f}); shuffle spread (fp32 seed 1) "
          f"{abs(other['valid_loss'] - fp32['valid_loss']):.4f}")


if __name__ == "__main__":
    main()
