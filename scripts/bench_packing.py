"""Packed vs random batches on real SFT data of mixed lengths: useful tokens/s and held-out loss, side by side.

The data are E2E (MR, reference) pairs recast as SmolLM2 chats (``lorakit.bench.tokens.bench_rows``, the
``tokens`` bench's SFT rows). Every side trains the same LoRA (r 8, q/v, same initial A) on SmolLM2-135M in
fp32 through the trainer's own loss (``lorakit.training.evaluate.loss_sum``, normalised by the batch's
target count), AdamW at the same lr, for the same number of steps; steps of the sides alternate, so drifting
machine load hits them alike. Sides:

* ``random``: lorakit's random batches of ``--batch`` records (``epoch_batches``, seed 0);
* ``packed``: ``--packing`` rows of ``--max-length`` tokens (``epoch_plan``, seed 0), as many rows per step
  as carry the same number of tokens as a random batch on average, so both sides train on about as many
  tokens per step;
* ``random-order2``: random batches from seed 1: how far the held-out loss moves with the shuffle alone.

Prints one JSON object: per side useful (non-pad) tokens/s, trained (target) tokens/s, padding share,
median step time, held-out loss (fp32, teacher-forced, on 64 rows none of the sides trains on), and the
packed/random ratios.

Usage: ``python scripts/bench_packing.py [--steps 20] [--batch 8] [--max-length 256]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from lorakit.bench.cases import Case
from lorakit.bench.worker import apply_method, shared_copy

from lorakit.bench.tokens import bench_rows
from lorakit.data.collate import IGNORE_INDEX
from lorakit.io.models import load_model
from lorakit.tasks import TaskSpec
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import collate, loss_sum
from lorakit.training.sampler import epoch_plan

SPEC = TaskSpec("sft", "generation", "causal-lm")
SIDES = ("packed", "random", "random-order2")


def _feeds(rows: list[dict[str, Any]], args: argparse.Namespace, pad: int) -> tuple[dict[str, list], int]:
    """The collated batches of each side (warm-up step first) and the packed side's rows per step."""
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    packed_rows = max(1, round(args.batch * mean / args.max_length))

    def plan(seed: int, packing: bool, batch: int) -> list[dict[str, torch.Tensor]]:
        cfg = TrainConfig(task="sft", data="-", batch_size=batch, seed=seed, packing=packing,
                          max_length=args.max_length)  # fmt: skip
        epoch_rows, batches = epoch_plan(rows, cfg, 0, 1)
        return [collate(SPEC, [epoch_rows[i] for i in b], pad) for b in batches[: args.steps + 1]]

    feeds = {"packed": plan(0, True, packed_rows), "random": plan(0, False, args.batch),
             "random-order2": plan(1, False, args.batch)}  # fmt: skip
    return feeds, packed_rows


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    (loss_sum(SPEC, model, batch) / targets).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _held_out(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(float(loss_sum(SPEC, model, b)) for b in batches)
    model.train()
    return total / sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def main() -> None:
    """Run the sides and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="records per random batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    base, tok = load_model("smollm2-135m")
    n = 64 + 2 * args.batch * (args.steps + 1) * 4
    rows = bench_rows(Case(id="packing", kind="tokens", data="sft"), tok, base.config.vocab_size, n)
    for r in rows:
        r["n_targets"] = sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX)
    held = [collate(SPEC, rows[i : i + 16], tok.pad_token_id) for i in range(0, 64, 16)]
    feeds, packed_rows = _feeds(rows[64:], args, tok.pad_token_id)
    models, opts = {}, {}
    for side in SIDES:
        torch.manual_seed(0)  # one initial A for every side
        models[side] = apply_method(shared_copy(base), "lorakit", 8, ("q", "v"))
        opts[side] = torch.optim.AdamW([p for p in models[side].parameters() if p.requires_grad], lr=args.lr)
        models[side].train()
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for k in range(args.steps + 1):
        for side in SIDES:
            started = time.perf_counter()
            _step(models[side], opts[side], feeds[side][k])
            if k:  # step 0 warms up
                times[side].append(time.perf_counter() - started)
        print(f"step {k}/{args.steps}", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"steps": args.steps, "batch_records": args.batch, "packed_rows": packed_rows,
                           "max_length": args.max_length, "sides": {}}  # fmt: skip
    for side in SIDES:
        timed = feeds[side][1:]
        useful = sum(int(b["attention_mask"].sum()) for b in timed)
        trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in timed)
        positions = sum(b["attention_mask"].numel() for b in timed)
        out["sides"][side] = {
            "useful_tok_s": useful / sum(times[side]), "trained_tok_s": trained / sum(times[side]),
            "tokens_per_step": useful / len(timed), "pad_share": 1 - useful / positions,
            "median_step_s": statistics.median(times[side]), "held_out_loss": _held_out(models[side], held),
        }  # fmt: skip
    s = out["sides"]
    out["packed_over_random_useful_tok_s"] = s["packed"]["useful_tok_s"] / s["random"]["useful_tok_s"]
    out["packed_over_random_trained_tok_s"] = s["packed"]["trained_tok_s"] / s["random"]["trained_tok_s"]
    out["packed_loss_rel_diff"] = s["packed"]["held_out_loss"] / s["random"]["held_out_loss"] - 1
    out["order_loss_rel_diff"] = s["random-order2"]["held_out_loss"] / s["random"]["held_out_loss"] - 1
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
