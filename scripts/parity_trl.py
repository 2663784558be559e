"""The chat SFT case of ``scripts/quality_parity.py``: lorakit against TRL's ``SFTTrainer`` + PEFT.

Both sides get the same 400 chats (the first (MR, reference) pairs of the shipped E2E file as a user turn
and an assistant turn), in the same order (the lorakit run's batches, fed to TRL through a sequential
sampler), the same LoRA (q, v, r 8, alpha 16, no dropout), budget (60 steps of 8, lr 5e-4, linear after 4
warm-up steps, weight decay and clipping as lorakit's defaults, fp32, no activation recompute: TRL's
``SFTConfig`` would default to bf16 and recompute) and completion-only loss, rendered with SmolLM2's chat
template. Both are scored by the same code (``lorakit.training.evaluate.score``): greedy
decoding of the 20 last, unseen MRs, each one example holding all its references (sacrebleu BLEU), plus
BLEU against the first reference only and the teacher-forced loss of every reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.data.e2e import load_e2e
from lorakit.io.models import load_model
from lorakit.metrics.d2t import d2t_metrics
from lorakit.tasks import load_task
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import score
from lorakit.training.sampler import epoch_batches
from lorakit.training.trainer import train

E2E_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "valid.txt"
N_TRAIN, N_EVAL = 400, 20


def _chat(mr: str, reference: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": mr}, {"role": "assistant", "content": reference}]}


def write_chat_data(folder: Path) -> Path:
    """``train.jsonl``: the first 400 (MR, reference) pairs as chats; ``valid.jsonl`` and ``test.jsonl``: every
    reference of the last 20 MRs, none of them trained on (the test file scores each MR once, all references).

    Args:
        folder: where to write (reused when it holds the files).
    """
    if (folder / "test.jsonl").is_file():
        return folder
    items = load_e2e(E2E_FILE)
    train_pairs = [(it.mr, ref) for it in items for ref in it.references][:N_TRAIN]
    held = items[-N_EVAL:]
    if {mr for mr, _ in train_pairs} & {it.mr for it in held}:
        raise SystemExit("the held-out MRs overlap the training pairs")
    folder.mkdir(parents=True, exist_ok=True)
    held_rows = [_chat(it.mr, ref) for it in held for ref in it.references]
    for name, rows in (("train", [_chat(mr, ref) for mr, ref in train_pairs]), ("valid", held_rows),
                       ("test", held_rows)):  # fmt: skip
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def chat_config(model: str, data: Path, seed: int, out: Path, steps: int, init: str | None = None) -> TrainConfig:
    """The lorakit side's config: its defaults plus the case's budget and greedy decoding.

    Args:
        model: the base. data: the chat folder. seed: the run's seed. out: its folder. steps: optimizer steps.
        init: the LoRA init (None: lorakit's default).
    """
    return TrainConfig(model=model, task="sft", data=str(data), seed=seed, out=str(out), max_steps=steps,
                       batch_size=8, lr=5e-4, warmup_steps=4, schedule="linear", max_length=256,
                       length_grouping=False, num_beams=1, no_repeat_ngram_size=0, max_new_tokens=64,
                       plot=False, keep_checkpoints=1, init=init)  # fmt: skip


def single_reference_bleu(predictions: list[str], items: list[Any]) -> float:
    """BLEU of the predictions against each example's first reference only (the issue's second figure)."""
    return d2t_metrics(predictions, [[it.references[0]] for it in items], with_meteor=False)["BLEU"]


def run_lorakit(cfg: TrainConfig) -> dict[str, float]:
    """lorakit's trainer; its own final evaluation is the score (greedy, all references)."""
    out = Path(cfg.out)
    result = train(cfg, overwrite=True)
    preds = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    data = load_task(cfg)
    result["BLEU_first_ref"] = single_reference_bleu([p["prediction"] for p in preds], data.eval)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = max(r["elapsed_s"] for r in last if r.get("split") == "train")
    result["s_per_step"] = elapsed / (cfg.max_steps or 1)
    return result


def lorakit_order(cfg: TrainConfig, n: int) -> list[int]:
    """The record indices the lorakit run trains on, step by step (its sampler, over as many epochs as needed).

    Args:
        cfg: the lorakit side's config. n: the number of training records.
    """
    order: list[int] = []
    epoch = 0
    while len(order) < (cfg.max_steps or 0) * cfg.batch_size:
        order += [i for batch in epoch_batches([{}] * n, cfg, epoch, 1) for i in batch]
        epoch += 1
    return order[: (cfg.max_steps or 0) * cfg.batch_size]


def run_trl(cfg: TrainConfig) -> dict[str, float]:
    """TRL's SFTTrainer + PEFT on the lorakit side's records, order and budget; scored by the same code."""
    import datasets
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    data = load_task(cfg)
    rows = [{"prompt": [{"role": r, "content": c} for r, c in rec.messages[:-1]],
             "completion": [{"role": "assistant", "content": rec.messages[-1][1]}]}
            for rec in (data.train[i] for i in lorakit_order(cfg, len(data.train)))]  # fmt: skip
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    args = SFTConfig(output_dir=str(Path(cfg.out) / "trl"), max_steps=cfg.max_steps, per_device_train_batch_size=8,
                     learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=cfg.warmup_steps,
                     weight_decay=cfg.weight_decay, max_grad_norm=cfg.clip_norm, seed=cfg.seed,
                     max_length=cfg.max_length, completion_only_loss=True, packing=False, report_to="none",
                     save_strategy="no", logging_steps=10, use_cpu=True, dataloader_num_workers=0,
                     # SFTConfig's own defaults differ from lorakit's run: bf16 autocast, activation recompute
                     bf16=False, gradient_checkpointing=False)  # fmt: skip
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = InOrder(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                      peft_config=lora)  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    trained = trainer.model.get_base_model().eval()  # the LoRA layers live in it; lorakit scores plain models
    trained.config.use_cache = True
    predictions: list[str] = []
    with torch.no_grad():
        result = score(trained, tok, data.spec, data.eval, cfg, torch.device("cpu"), predictions_out=predictions)
    result["BLEU_first_ref"] = single_reference_bleu(predictions, data.eval)
    result["s_per_step"] = elapsed / (cfg.max_steps or 1)
    (Path(cfg.out) / "trl_predictions.jsonl").write_text(
        "".join(json.dumps({"mr": it.mr, "prediction": p}) + "\n" for it, p in zip(data.eval, predictions)))
    return result
