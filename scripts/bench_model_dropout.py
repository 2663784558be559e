"""What the base model's own dropout costs a LoRA training step, side by side in one process.

MiniLM-L6 with the demo's adapter (Wq, Wv, r=8, classifier and pooler trained) takes training steps on
batches of the demo's review snippets. Steps alternate between the model's own dropout (0.1, as its config
says) and none (``--model-dropout 0``, ``lorakit.io.models.set_model_dropout``), on the same weights and the
same batches, so machine load hits both sides alike. Prints the median step time of each and the ratio.

    .venv/bin/python scripts/bench_model_dropout.py --steps 12 --batch-size 32
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from lorakit.demo import DEMO_LABELS, shipped_snippets
from lorakit.io.models import load_model, set_model_dropout
from lorakit.training.config import TrainConfig
from lorakit.training.prepare import prepare_model


def batches(tokenizer, n: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` random batches of review snippets, padded to their longest row (at most 64 tokens)."""
    reviews = [(t, DEMO_LABELS["sentiment"].index(c)) for t, c in shipped_snippets() if c != "plot"]
    rows = random.Random(seed).sample(reviews, n * size)
    out = []
    for i in range(0, len(rows), size):
        texts, labels = zip(*rows[i : i + size])
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        out.append({**batch, "labels": torch.tensor(labels)})
    return out


def step_seconds(model, optimizer, batch: dict[str, torch.Tensor]) -> float:
    started = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="measured steps per side (after 2 warm-up pairs)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    prepare_model(model, TrainConfig(task="text", data="-", r=8, alpha=16, targets=["q", "v"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times: dict[float, list[float]] = {0.1: [], 0.0: []}
    for i, batch in enumerate(batches(tokenizer, args.steps + 2, args.batch_size, seed=0)):
        for rate in times:  # the same batch on both sides, in turn
            set_model_dropout(model, rate)
            seconds = step_seconds(model, optimizer, batch)
            if i >= 2:
                times[rate].append(seconds)
    on, off = (statistics.median(times[r]) for r in (0.1, 0.0))
    print(f"MiniLM-L6 + LoRA (q, v, r=8), batch {args.batch_size}, {args.steps} steps a side, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'model dropout 0.1 (its config)':<34}{on * 1000:8.1f} ms/step")
    print(f"{'model dropout 0 (--model-dropout 0)':<34}{off * 1000:8.1f} ms/step   {off / on:.2f}x")


if __name__ == "__main__":
    main()
