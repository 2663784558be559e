"""Packed vs random batches on real SFT data, lorakit against TRL ``SFTTrainer``: trained tokens/s and held-out
loss, side by side in one run.

The data are E2E (MR, reference) pairs recast as SmolLM2 chats (``lorakit.bench.tokens.bench_rows``, the
``tokens`` bench's SFT rows), or with ``--data mix`` the same chats mixed with WebNLG and DART triple sets and
RTE pairs (all from ``../shared/data``; wider lengths). Every side trains the same LoRA (r 8, alpha 16, q/v,
same initial A) on SmolLM2-135M in fp32 on the same records, completion tokens only, AdamW at the same lr
(weight decay 0.01, gradient norm clipped to 1, constant lr) for ``1 + --steps`` steps (the first warms up
and is not timed). Steps of the sides alternate, so drifting machine load hits them alike. Sides:

* ``packed``: lorakit's ``--packing`` rows of ``--max-length`` tokens (``epoch_plan``, seed 0), as many rows per
  step as carry the tokens of a random batch on average (by the rows' real fill, not ``--max-length``);
* ``random``: lorakit's random batches of ``--batch`` records (``epoch_plan``, seed 0);
* ``random-order2``: random batches from seed 1: how far the held-out loss moves with the shuffle alone;
* ``trl-packed``: ``SFTTrainer(packing=True, padding_free=True)`` (BFD packing to ``--max-length``), as many
  rows per step as ``packed``;
* ``trl-padded``: ``SFTTrainer`` without packing, batches of ``--batch`` records padded to the longest.

The lorakit sides run the trainer's pieces (sampler, collate, ``loss_sum`` normalised by the step's target
count, clipping, AdamW), collation included in the timed step. Each TRL side is a real ``trainer.train()`` in
its own thread, held between steps by a callback so that only one side computes at a time; its step time runs
from one step's end to the next, so the Trainer's own overhead (data loader, collator, logging) counts, as a
user would see it (it logs every 10 steps, its default). TRL's defaults that differ from the lorakit sides' are
set to theirs: no gradient checkpointing, fp32.

Prints one JSON object: per side useful (non-pad) and trained (target) tokens/s, padding share, median step
time, held-out loss (fp32, teacher-forced, on 64 records none of the sides trains on), and the ratios.

Usage: ``python scripts/bench_packing.py [--steps 8] [--batch 8] [--max-length 256] [--data e2e|mix]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.bench.build import apply_method, inner_model, peft_add, shared_copy
from lorakit.bench.measure import copy_peft_init
from lorakit.bench.suites import Case
from lorakit.bench.tokens import bench_rows
from lorakit.data.collate import IGNORE_INDEX
from lorakit.io.models import load_model
from lorakit.tasks import TaskSpec
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import collate, loss_sum
from lorakit.training.sampler import epoch_plan

SPEC = TaskSpec("sft", "generation", "causal-lm")
OURS = ("packed", "random", "random-order2")
TRL = ("trl-packed", "trl-padded")
SIDES = (*OURS, *TRL)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _mix_rows(tok: Any, n: int) -> list[dict[str, Any]]:
    """E2E, WebNLG, DART and RTE records as chats, a quarter each, shuffled: a mixed-length SFT set."""
    from lorakit.data.e2e import load_e2e
    from lorakit.data.glue import load_glue
    from lorakit.data.sft import SftRecord, encode_sft
    from lorakit.data.webnlg import load_dart, load_webnlg

    d2t = [(f"Describe: {it.mr}", it.references[0]) for it in load_e2e(DATA / "e2e" / "valid.txt")]
    triples = (load_webnlg(DATA / "webnlg" / "dev.json"), load_dart(DATA / "dart" / "dev.json"))
    d2t_sets = [d2t] + [[(f"Describe these facts: {it.mr}", it.references[0]) for it in items] for items in triples]
    rte = [(f"Premise: {x.text}\nHypothesis: {x.text_pair}\nDoes the premise entail the hypothesis?",
            "yes, it does." if x.label == 0 else "no, it does not.")
           for x in load_glue("rte", DATA / "glue", "train")]  # fmt: skip
    pairs = []
    for k, source in enumerate([*d2t_sets, rte]):
        random.Random(k).shuffle(source)
        pairs += source[: n // 4 + 1]
    random.Random(0).shuffle(pairs)
    records = [SftRecord(f"r{i}", messages=(("user", u), ("assistant", a))) for i, (u, a) in enumerate(pairs[:n])]
    return encode_sft(records, tok, 256)


def _rows(args: argparse.Namespace, tok: Any, vocab: int) -> list[dict[str, Any]]:
    n = 64 + 2 * args.batch * (args.steps + 1) * 4
    if args.data == "mix":
        rows = _mix_rows(tok, n)
    else:
        rows = bench_rows(Case(id="packing", kind="tokens", data="sft"), tok, vocab, n)
    for r in rows:
        r["n_targets"] = sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX)
    return rows


def _feeds(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, list], int]:
    """The rows of each lorakit side's steps (warm-up step first) and the packed sides' rows per step."""
    def plan(seed: int, packing: bool, batch: int) -> list[list[dict[str, Any]]]:
        cfg = TrainConfig(task="sft", data="-", batch_size=batch, seed=seed, packing=packing,
                          max_length=args.max_length)  # fmt: skip
        epoch_rows, batches = epoch_plan(rows, cfg, 0, 1)
        return [[epoch_rows[i] for i in b] for b in batches[: args.steps + 1]]

    tokens = sum(len(r["input_ids"]) for r in rows)
    filled = len(epoch_plan(rows, TrainConfig(task="sft", data="-", packing=True, max_length=args.max_length), 0, 1)[0])
    # The tokens a packed row carries on average (rows are not full), against a random batch's.
    packed_rows = max(1, round(args.batch * tokens / len(rows) / (tokens / filled)))
    feeds = {"packed": plan(0, True, packed_rows), "random": plan(0, False, args.batch),
             "random-order2": plan(1, False, args.batch)}  # fmt: skip
    return feeds, packed_rows


class OurSide:
    """A lorakit side: the trainer's collate, loss, clipping and AdamW over planned batches."""

    def __init__(self, model: torch.nn.Module, batches: list[list[dict[str, Any]]], pad: int, lr: float) -> None:
        self.model, self.batches, self.pad, self.k = model, batches, pad, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        self.seen: list[dict[str, torch.Tensor]] = []
        model.train()

    def step(self) -> None:
        batch = collate(SPEC, self.batches[self.k], self.pad)
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        (loss_sum(SPEC, self.model, batch) / targets).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.seen.append(batch)
        self.k += 1


class TrlSide:
    """A TRL side: ``trainer.train()`` in a thread, released one optimizer step at a time by ``step()``."""

    def __init__(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        self.trainer, self.go, self.done = trainer, threading.Semaphore(0), threading.Semaphore(0)
        self.seen: list[dict[str, torch.Tensor]] = []
        self.error: BaseException | None = None
        side = self

        class Hold(TrainerCallback):
            def on_train_begin(self, *a: Any, **kw: Any) -> None:
                side.go.acquire()

            def on_step_end(self, *a: Any, **kw: Any) -> None:
                side.done.release()
                side.go.acquire()

        trainer.add_callback(Hold())
        collator = trainer.data_collator

        def recording(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collator(examples)
            self.seen.append({k: batch[k] for k in ("input_ids", "labels", "attention_mask") if k in batch})
            return batch

        trainer.data_collator = recording
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.trainer.train()
        except BaseException as e:  # reported by step()
            self.error = e
        finally:
            self.done.release()

    def step(self) -> None:
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError("TRL side failed") from self.error

    def finish(self) -> None:
        self.go.release()
        self.thread.join()
        self.model = self.trainer.model


def _trl_side(base: torch.nn.Module, tok: Any, rows: list[dict[str, Any]], args: argparse.Namespace, packed: bool,
              batch: int, out: str) -> TrlSide:  # fmt: skip
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)  # PEFT's initial A, the same for every side
    model = peft_add(shared_copy(base), 8, ("q", "v"))
    config = SFTConfig(
        output_dir=out, max_steps=args.steps + 1, per_device_train_batch_size=batch, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0, seed=0,
        max_length=args.max_length, packing=packed, padding_free=packed, completion_only_loss=True,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    return TrlSide(SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok))


def _held_out(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(float(loss_sum(SPEC, model, b)) for b in batches)
    return total / sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def _tokens(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int, int]:
    """Useful (non-pad) tokens, trained (target) tokens and positions computed, over ``batches``."""
    useful = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return useful, trained, sum(b["input_ids"].numel() for b in batches)


def _sides(base: torch.nn.Module, tok: Any, rows: list[dict[str, Any]], args: argparse.Namespace,
           tmp: str) -> tuple[dict[str, Any], int]:  # fmt: skip
    feeds, packed_rows = _feeds(rows, args)
    sides: dict[str, Any] = {
        "trl-packed": _trl_side(base, tok, rows, args, True, packed_rows, f"{tmp}/p"),
        "trl-padded": _trl_side(base, tok, rows, args, False, args.batch, f"{tmp}/u"),
    }
    for side in OURS:
        model = apply_method(shared_copy(base), "lorakit", 8, ("q", "v"))
        copy_peft_init(sides["trl-packed"].trainer.model, model)  # one initial A for every side
        sides[side] = OurSide(model, feeds[side], tok.pad_token_id, args.lr)
    return sides, packed_rows


def _summary(sides: dict[str, Any], times: dict[str, list[float]], held: list, args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {"steps": args.steps, "batch_records": args.batch, "max_length": args.max_length,
                           "data": args.data, "threads": torch.get_num_threads(), "sides": {}}  # fmt: skip
    for name, side in sides.items():
        useful, trained, positions = _tokens(side.seen[1 : args.steps + 1])  # step 0 warms up
        model = inner_model(side.model) if name in TRL else side.model
        out["sides"][name] = {
            "useful_tok_s": useful / sum(times[name]), "trained_tok_s": trained / sum(times[name]),
            "tokens_per_step": useful / args.steps, "pad_share": 1 - useful / positions,
            "median_step_s": statistics.median(times[name]), "held_out_loss": _held_out(model, held),
        }  # fmt: skip
    s = out["sides"]
    for name in ("random", "trl-packed", "trl-padded"):
        out[f"packed_over_{name}_trained_tok_s"] = s["packed"]["trained_tok_s"] / s[name]["trained_tok_s"]
    for name in ("packed", "random-order2", "trl-packed", "trl-padded"):
        out[f"{name}_loss_rel_diff_vs_random"] = s[name]["held_out_loss"] / s["random"]["held_out_loss"] - 1
    return out


def main() -> None:
    """Run the sides and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side, after one warm-up step")
    parser.add_argument("--batch", type=int, default=8, help="records per random batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data", choices=("e2e", "mix"), default="e2e")
    args = parser.parse_args()
    base, tok = load_model("smollm2-135m")
    rows = _rows(args, tok, base.config.vocab_size)
    held = [collate(SPEC, rows[i : i + 16], tok.pad_token_id) for i in range(0, 64, 16)]
    # TRL prints its log lines to stdout: keep stdout for the summary.
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp, contextlib.redirect_stdout(sys.stderr):
        sides, packed_rows = _sides(base, tok, rows[64:], args, tmp)
        times: dict[str, list[float]] = {s: [] for s in SIDES}
        for k in range(args.steps + 1):
            for name in SIDES:
                started = time.perf_counter()
                sides[name].step()
                if k:
                    times[name].append(time.perf_counter() - started)
            print(f"step {k}/{args.steps}", file=sys.stderr, flush=True)
        for name in TRL:
            sides[name].finish()
        out = _summary(sides, times, held, args)
    out["packed_rows_per_step"] = packed_rows
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
