"""DPO parity: lorakit's ``--task dpo`` against TRL's ``DPOTrainer`` + PEFT, side by side on the same budget.

Both sides train SmolLM2-135M (lorakit's loader) with LoRA on q, v (r=8, alpha=16, dropout 0) on the same
preference pairs (``scripts/e2e_preference.py``), in the same batches of 8 pairs in the same order (lorakit's
seeded order; TRL reads it sequentially), with the same beta, lr, steps, AdamW settings (weight decay 0.01,
gradient clipping 1.0) and a linear decay with no warm-up (the two libraries' warm-up formulas differ).
The reference is the base with the adapter switched off on both sides. Each side logs every step's training
loss (step 1's is the loss before any update: ln 2 when the adapter's B is zero) and scores the same held-out
pairs with its own code. The TRL-trained adapter is also scored by lorakit's code, to tell a training
difference from a scoring one. The tokenization of every pair is compared too.

    python scripts/e2e_preference.py ../shared/data/e2e/valid.txt --out /tmp/e2e-pref
    python scripts/dpo_parity.py --data /tmp/e2e-pref --steps 16 --seeds 1,2 --out runs/dpo-parity

Writes ``dpo_parity.json`` (every run; finished runs are skipped on a rerun) and ``dpo_parity.md`` (the table).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.data.preference import encode_preference
from lorakit.io.models import load_model, quiet_third_party_notices
from lorakit.tasks import load_task
from lorakit.training.config import TrainConfig
from lorakit.training.sampler import epoch_batches

MODEL = "smollm2-135m"
# lorakit with PEFT's LoRA init (the parity side), TRL, and lorakit with its own default init.
SIDES = ("lorakit", "trl", "lorakit-default")
MAX_LENGTH = 256  # no E2E pair is that long: neither side truncates (their truncation rules differ)
# (lorakit key, TRL's eval key) of each held-out figure; lorakit logs the same names on train lines.
METRICS = (("loss", "eval_loss"), ("reward_accuracy", "eval_rewards/accuracies"),
           ("reward_margin", "eval_rewards/margins"), ("chosen_reward", "eval_rewards/chosen"),
           ("rejected_reward", "eval_rewards/rejected"), ("chosen_logps", "eval_logps/chosen"),
           ("rejected_logps", "eval_logps/rejected"))  # fmt: skip


def lorakit_config(args: argparse.Namespace, seed: int, out: Path, init: str | None = "kaiming") -> TrainConfig:
    """The lorakit side's run (A initialised as PEFT does, unless ``init`` says otherwise); TRL's settings are
    derived from it."""
    return TrainConfig(model=MODEL, task="dpo", data=str(args.data), targets=["q", "v"], r=8, alpha=16.0, dropout=0.0,
                       init=init,
                       beta=args.beta, lr=args.lr, max_steps=args.steps, batch_size=8, warmup_steps=0,
                       schedule="linear", weight_decay=0.01, clip_norm=1.0, seed=seed, log_interval=1,
                       max_valid_samples=8, max_eval_samples=args.eval_pairs, eval_batch_size=16, out=str(out),
                       max_length=MAX_LENGTH, plot=False, keep_checkpoints=1)  # fmt: skip


def run_lorakit(cfg: TrainConfig) -> dict[str, Any]:
    """Train with ``lorakit.training.train``; the held-out score and every step's training loss."""
    from lorakit.training.trainer import train

    started = time.perf_counter()
    held_out = train(cfg, overwrite=True)
    seconds = time.perf_counter() - started
    lines = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x.get("split") == "train"]
    return {"held_out": {k: held_out[k] for k, _ in METRICS}, "train_loss": [x["loss"] for x in train_lines],
            "train_s": train_lines[-1]["elapsed_s"], "wall_s": seconds}  # fmt: skip


def batch_order(cfg: TrainConfig, rows: list[dict[str, Any]]) -> list[int]:
    """The pair indices of lorakit's first ``max_steps`` batches, in order (epochs chained as the trainer does)."""
    batches = itertools.chain.from_iterable(epoch_batches(rows, cfg, epoch, 1) for epoch in itertools.count())
    return [i for batch in itertools.islice(batches, cfg.max_steps) for i in batch]


def _as_dicts(records: list[Any]) -> list[dict[str, str]]:
    return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]


def trl_trainer(cfg: TrainConfig, out: Path) -> tuple[Any, Any, list[dict[str, Any]]]:
    """TRL's DPOTrainer on a fresh base + PEFT config, fed lorakit's batches in order; (trainer, task data,
    lorakit's encoding of the training pairs)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    data = load_task(cfg)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model, "causal-lm")
    rows = encode_preference(data.train, tok, MAX_LENGTH)
    ordered = [data.train[i] for i in batch_order(cfg, rows)]
    args = DPOConfig(output_dir=str(out), beta=cfg.beta, learning_rate=cfg.lr, max_steps=cfg.max_steps,
                     per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
                     train_sampling_strategy="sequential", warmup_steps=0, lr_scheduler_type="linear",
                     weight_decay=cfg.weight_decay, max_grad_norm=cfg.clip_norm, adam_epsilon=cfg.adam_eps,
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                     seed=cfg.seed, max_length=MAX_LENGTH, dataloader_num_workers=0)  # fmt: skip
    lora = LoraConfig(r=cfg.r, lora_alpha=int(cfg.alpha), lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, peft_config=lora,
                         train_dataset=Dataset.from_list(_as_dicts(ordered)),
                         eval_dataset=Dataset.from_list(_as_dicts(data.eval)))  # fmt: skip
    return trainer, data, [rows[i] for i in batch_order(cfg, rows)]


def same_tokens(dataset: Any, rows: list[dict[str, Any]]) -> int:
    """How many pairs TRL tokenized into exactly lorakit's ids (prompt, chosen, rejected)."""
    same = 0
    for theirs, ours in zip(dataset, rows):  # TRL drops no E2E pair (none fills max_length)
        n = sum(1 for t in ours["chosen_labels"] if t == -100)
        same += (theirs["prompt_ids"] == ours["chosen_input_ids"][:n] and theirs["chosen_ids"] ==
                 ours["chosen_input_ids"][n:] and theirs["rejected_ids"] == ours["rejected_input_ids"][n:])  # fmt: skip
    return same


def run_trl(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """Train with TRL; its own held-out score, every step's loss, and lorakit's score of the TRL adapter."""
    trainer, data, rows = trl_trainer(cfg, out)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    theirs = trainer.evaluate()
    trainer.model.save_pretrained(out / "adapter")
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x and "train_runtime" not in x]
    held_out_rows = encode_preference(data.eval, trainer.processing_class, MAX_LENGTH)
    return {"held_out": {k: theirs[key] for k, key in METRICS}, "train_loss": losses, "train_s": seconds,
            "same_tokens": same_tokens(trainer.train_dataset, rows), "pairs": len(rows),
            "same_tokens_held_out": same_tokens(trainer.eval_dataset, held_out_rows),
            "held_out_by_lorakit": score_with_lorakit(cfg, out / "adapter", data.eval)}  # fmt: skip


def score_with_lorakit(cfg: TrainConfig, adapter: Path, pairs: list[Any]) -> dict[str, float]:
    """lorakit's held-out metrics of a PEFT adapter (loaded by lorakit onto a fresh base)."""
    from lorakit.io.files import load_adapter
    from lorakit.training.preference import preference_metrics

    model, tok = load_model(cfg.model, "causal-lm")
    load_adapter(model, adapter)
    return preference_metrics(model, tok, pairs, cfg, torch.device("cpu"))


def _cell(vals: list[float]) -> str:
    if not vals:
        return "—"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.4f} ± {sd:.4f} ({', '.join(f'{v:.4f}' for v in vals)})"


def summarize(results: dict[str, Any], seeds: list[int], steps: int) -> str:
    """The parity table: step-1 training loss, then each held-out figure as mean ± sd (per seed) per side."""
    runs = {side: [results[f"{side}/{s}"] for s in seeds if f"{side}/{s}" in results] for side in SIDES}
    columns = {
        "lorakit (init kaiming, as PEFT)": [r["held_out"] for r in runs["lorakit"]],
        "TRL DPOTrainer + PEFT": [r["held_out"] for r in runs["trl"]],
        "TRL's adapters scored by lorakit": [r["held_out_by_lorakit"] for r in runs["trl"]],
        "lorakit default init (gaussian 1/r)": [r["held_out"] for r in runs["lorakit-default"]],
    }
    lines = [f"| after {steps} steps | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    first = [[r["train_loss"][0] for r in runs[side]] for side in ("lorakit", "trl")]
    lines.append(
        "| training loss at step 1 (before any update; ln 2 = "
        f"{math.log(2):.7f}) | " + " | ".join(", ".join(f"{v:.7f}" for v in f) for f in first) + " | | |"
    )
    for key, _ in METRICS:
        cells = [_cell([h[key] for h in col]) for col in columns.values()]
        lines.append(f"| held-out {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the folder scripts/e2e_preference.py wrote")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs scored (a fixed subset)")
    parser.add_argument("--out", type=Path, default=Path("runs/dpo-parity"))
    parser.add_argument("--sides", default="lorakit,trl", help=f"of {','.join(SIDES)}, run in this order per seed")
    args = parser.parse_args(argv)
    quiet_third_party_notices()
    seeds = [int(s) for s in args.seeds.split(",")]
    store = args.out / "dpo_parity.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed, side in itertools.product(seeds, args.sides.split(",")):
        if f"{side}/{seed}" in results:
            continue
        cfg = lorakit_config(args, seed, args.out / f"{side}-s{seed}", None if side == "lorakit-default" else "kaiming")
        results[f"{side}/{seed}"] = run_trl(cfg, args.out / f"trl-s{seed}") if side == "trl" else run_lorakit(cfg)
        print(f"dpo-parity: {side}/{seed}: {json.dumps(results[f'{side}/{seed}']['held_out'])}", file=sys.stderr)
        store.write_text(json.dumps(results, indent=1))
    table = summarize(results, seeds, args.steps)
    (args.out / "dpo_parity.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
