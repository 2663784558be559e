"""Useful (non-pad) tokens per second of training on real padded batches: lorakit with length-grouped
batches, lorakit with random batches, and PEFT in a plain loop with random batches, from the same start,
for the same number of steps (plus lorakit with the random batches of another shuffle, to show how far the
held-out loss moves with the batch order alone), on E2E (MR, reference) pairs or on the same pairs recast
as SFT chats.

Steps of the sides alternate, so drifting machine load hits them alike. Each side then reports the
held-out loss (fp32, teacher-forced, on rows none of them trained on), so a speed-up that costs quality
shows.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch
from torch import nn

from lorakit.bench.suites import Case

# "lorakit-random-order2" is random batching from another shuffle: how far the held-out loss moves with the
# batch order alone, the yardstick for "equal loss" after a short run.
SIDES = ("lorakit-grouped", "lorakit-random", "peft-random", "lorakit-random-order2")


def tokens_cases(device: str = "cpu") -> list[Case]:
    """The bench cases (slow: dozens of real SmolLM2 steps per side)."""
    return [
        Case(id=f"tokens/smollm2-135m/{data}", kind="tokens", data=data, batch=16, loss="labels", group="tokens",
             warmup=1, repeats=12, device=device)
        for data in ("e2e", "sft")
    ]


def _synthetic_rows(n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    # Without a tokenizer (random GPT-2 configs): E2E-like lengths (prompt ~34, reference 10-60 tokens).
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, target = rng.randint(15, 50), rng.randint(10, 60)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + target)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def bench_rows(case: Case, tokenizer: Any, vocab: int, n: int) -> list[dict[str, list[int]]]:
    """``n`` encoded rows: E2E pairs (``case.data == "e2e"``) or the same pairs as chats (``"sft"``)."""
    from lorakit.bench.build import e2e_file

    path = e2e_file()
    if tokenizer is None or path is None:
        return _synthetic_rows(n, vocab)
    from lorakit.data.collate import encode_e2e_for_training, encoded_rows
    from lorakit.data.e2e import load_e2e
    from lorakit.data.sft import SftRecord, encode_sft

    items = load_e2e(path)
    pairs = [(it.mr, ref) for it in items for ref in it.references]
    random.Random(0).shuffle(pairs)  # the file groups references by MR
    pairs = pairs[:n]
    if case.data == "sft":
        records = [SftRecord(f"pair {i}", messages=(("user", f"Describe: {mr}"), ("assistant", ref)))
                   for i, (mr, ref) in enumerate(pairs)]  # fmt: skip
        return encode_sft(records, tokenizer, 256)
    from lorakit.data.e2e import E2EItem

    return encoded_rows(encode_e2e_for_training([E2EItem(mr, [ref]) for mr, ref in pairs], tokenizer, 256))


def _orders(rows: list[dict[str, Any]], case: Case) -> dict[str, list[list[int]]]:
    from lorakit.training.config import TrainConfig
    from lorakit.training.sampler import epoch_batches

    def batches(grouping: bool, seed: int) -> list[list[int]]:
        cfg = TrainConfig(task="sft", data="-", batch_size=case.batch, length_grouping=grouping, seed=seed)
        return epoch_batches(rows, cfg, epoch=0, world_size=1)

    random_batches = batches(False, 0)
    return {"lorakit-grouped": batches(True, 0), "lorakit-random": random_batches, "peft-random": random_batches,
            "lorakit-random-order2": batches(False, 1)}


def _collate(rows: list[dict[str, Any]], idx: list[int], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    from lorakit.data.collate import collate_causal_lm

    batch = [{"input_ids": rows[i]["input_ids"], "attention_mask": [1] * len(rows[i]["input_ids"]),
              "labels": rows[i]["labels"]} for i in idx]  # fmt: skip
    return {k: v.to(device) for k, v in collate_causal_lm(batch, pad_id).items()}


def _held_out_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean per-target loss (teacher forcing, fp32) over the held-out batches."""
    from lorakit.bench.build import inner_model
    from lorakit.lora.kernels import causal_lm_loss

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(causal_lm_loss(inner_model(model), b["input_ids"], b["attention_mask"], b["labels"])) * n
            count += n
    model.train()
    return total / max(count, 1)


def run_tokens(case: Case, measure: Any) -> dict[str, Any]:
    """``warmup + repeats`` steps per side, interleaved; useful tokens/s over the timed steps."""
    from lorakit.bench.build import apply_method, build_model, make_train_step, shared_copy
    from lorakit.bench.measure import copy_peft_init

    base, tok = build_model(case.model)
    base = base.to(case.device)
    pad_id = tok.pad_token_id if tok is not None else 0
    steps = case.warmup + case.repeats
    rows = bench_rows(case, tok, base.config.vocab_size, steps * case.batch * 4 + 64)
    held_rows, rows = rows[:64], rows[64:]
    held = [_collate(held_rows, list(range(i, i + 16)), pad_id, case.device) for i in range(0, 64, 16)]
    orders = _orders(rows, case)
    ours = [s for s in SIDES if s.startswith("lorakit")]
    models = {s: apply_method(shared_copy(base), "lorakit", case.r, case.targets) for s in ours}
    models["peft-random"] = apply_method(base, "peft", case.r, case.targets)
    for side in ours:
        copy_peft_init(models["peft-random"], models[side])  # one start for every side
    feeds = {s: [_collate(rows, orders[s][k], pad_id, case.device) for k in range(steps)] for s in SIDES}
    train_steps = {s: make_train_step(models[s], feeds[s], "fp32", "model" if s.startswith("peft") else case.loss,
                                      case.device, lr=1e-3) for s in SIDES}  # fmt: skip
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    with measure.block():
        for k in range(steps):
            for s in SIDES:
                started = time.perf_counter()
                train_steps[s]()
                if k >= case.warmup:
                    times[s].append(time.perf_counter() - started)
    sides = {}
    for s in SIDES:
        timed = feeds[s][case.warmup :]
        useful = sum(int(b["attention_mask"].sum()) for b in timed)
        positions = sum(b["attention_mask"].numel() for b in timed)
        sides[s] = {"useful_tok_s": useful / sum(times[s]), "pad_share": 1 - useful / positions,
                    "median_s": statistics.median(times[s]),
                    "held_out_loss": _held_out_loss(models[s], held)}  # fmt: skip
    tok_s = {s: v["useful_tok_s"] for s, v in sides.items()}
    loss = {s: v["held_out_loss"] for s, v in sides.items()}
    return {"grouped_loss_rel_diff": loss["lorakit-grouped"] / loss["lorakit-random"] - 1,
            "order_loss_rel_diff": loss["lorakit-random-order2"] / loss["lorakit-random"] - 1,
            "random_loss_rel_diff": loss["lorakit-random"] / loss["peft-random"] - 1,
            "random_over_peft": tok_s["lorakit-random"] / tok_s["peft-random"],
            "median_s": sides["lorakit-grouped"]["median_s"], "sides": sides,
            "grouped_over_peft": tok_s["lorakit-grouped"] / tok_s["peft-random"],
            "grouped_over_random": tok_s["lorakit-grouped"] / tok_s["lorakit-random"]}  # fmt: skip
