"""Encoding, loss and scoring for every task: what the trainer and ``lorakit eval`` run on a task's data.

Task definitions (what a task is, where its data comes from) live in ``lorakit.tasks``; the metrics that
score them in ``lorakit.metrics`` (``spec.metric`` names the entry).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.data import (
    IGNORE_INDEX,
    DataError,
    E2EItem,
    Example,
    collate_causal_lm,
    collate_classification,
    encode_classification,
    encode_e2e_for_training,
    encode_e2e_prompt,
    encoded_rows,
)
from lorakit.data.packing import collate_packed
from lorakit.data.preference import collate_preference, encode_preference
from lorakit.data.sft import SftRecord, encode_sft, expand_references
from lorakit.data.truncation import Truncation, measure_truncation
from lorakit.metrics.registry import get_metric
from lorakit.tasks import TaskSpec
from lorakit.training.config import TrainConfig
from lorakit.training.preference import preference_metrics

__all__ = [
    "balanced_class_weights", "collate", "encode", "generate_e2e", "loss_sum", "mean_loss",
    "predict_classification", "report_truncation", "score", "set_class_weights", "token_lengths", "validate",
]  # fmt: skip

UNCUT = 1_000_000  # a max_length nothing reaches: lengths are measured before the cut

# Metrics that score a majority-class predictor at 0 whatever the class balance: a model trained on the
# plain loss for them sits at that 0 for most of a short run (docs/records/training-defaults.md).
BALANCE_FOR_METRICS = ("matthews_corr",)


def set_class_weights(spec: TaskSpec, train: Sequence[Example], mode: str) -> None:
    """Fill ``spec.class_weights`` for ``mode``: "none", "balanced", or "auto" (balanced for tasks scored
    by a metric in ``BALANCE_FOR_METRICS``, else none).

    Args:
        spec: a classification task (other kinds are left alone).
        train: its training examples.
        mode: the ``class_weights`` setting.
    """
    auto = mode == "auto" and any(m in BALANCE_FOR_METRICS for m in spec.metrics)
    if spec.kind == "classification" and (mode == "balanced" or auto):
        spec.class_weights = balanced_class_weights([int(ex.label) for ex in train], spec.num_labels or 2)


def balanced_class_weights(labels: Sequence[int], num_labels: int) -> list[float]:
    """n / (K * n_c) per class c: every class weighs the same in the loss, and the weights average to 1
    over the training examples (so the loss keeps its scale).

    Args:
        labels: the training labels (class indices).
        num_labels: K, the number of classes.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    if (counts == 0).any():
        missing = [i for i, c in enumerate(counts) if c == 0]
        raise DataError(f"class weights: no training example has label(s) {missing}")
    return [float(len(labels) / (num_labels * c)) for c in counts]


# -- encoding ----------------------------------------------------------------------------------------------
def encode(
    spec: TaskSpec, items: Sequence[Any], tokenizer: Any, max_length: int, truncation: str = "left"
) -> list[dict[str, Any]]:
    """Tokenized rows (unpadded); each row also carries ``n_targets``, the number of loss terms it adds."""
    if spec.kind == "preference":
        return encode_preference(items, tokenizer, max_length)
    if spec.name == "sft":
        return encode_sft_rows(items, tokenizer, max_length, truncation)
    if spec.kind == "generation":
        rows = encoded_rows(encode_e2e_for_training(items, tokenizer, max_length, truncation=truncation))
        for row in rows:
            # Position t predicts token t+1, so a label at position 0 never enters the loss.
            row["n_targets"] = sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)
    else:
        rows = encoded_rows(encode_classification(items, tokenizer, max_length))
        for row in rows:
            if spec.kind == "regression":
                row["labels"] = spec.scale_target(row["labels"])
            row["n_targets"] = 1
    return rows


def token_lengths(spec: TaskSpec, items: Sequence[Any], tokenizer: Any) -> list[int]:
    """Each example's length in tokens before any cut (generation: one per (input, reference) pair), encoded
    exactly as training encodes it.

    Args:
        spec: the task.
        items: its examples.
        tokenizer: the model's tokenizer.
    """
    if not items:
        return []
    return [len(r["input_ids"]) for r in encode(spec, items, tokenizer, UNCUT, "left")]


def report_truncation(
    spec: TaskSpec, splits: dict[str, Sequence[Any]], tokenizer: Any, max_length: int
) -> list[Truncation]:
    """One ``Truncation`` per non-empty split (``lorakit.data.truncation``); the caller prints the lines.

    Args:
        spec: the task.
        splits: role -> examples ("train", "valid", "eval"; a split that is another's object is measured once).
        tokenizer: the model's tokenizer.
        max_length: the run's ``max_length``.
    """
    out, seen = [], []
    for role, items in splits.items():
        if items and not any(items is other for other in seen):
            seen.append(items)
            out.append(measure_truncation(spec.name, role, token_lengths(spec, items, tokenizer), max_length))
    return out


def collate(spec: TaskSpec, rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    if spec.kind == "preference":
        return collate_preference(rows, pad_token_id)
    if rows and "position_ids" in rows[0]:
        return collate_packed(rows, pad_token_id)
    rows = [{k: v for k, v in r.items() if k != "n_targets"} for r in rows]
    if spec.kind == "generation":
        return collate_causal_lm(rows, pad_token_id)
    return collate_classification(rows, pad_token_id)


def loss_sum(
    spec: TaskSpec, model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0
) -> Tensor:
    """Sum (not mean) of per-target losses, so the trainer can normalise by the global target count."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:
        # Packed rows: with no 2-D mask and no cache, transformers builds the block-diagonal causal mask from
        # position_ids (masking_utils.find_packed_sequence_indices); either one would switch it off.
        inputs["attention_mask"] = None
    labels = batch["labels"]
    if spec.kind == "generation":
        from lorakit.lora.kernels import causal_lm_loss
        from lorakit.methods.prefix import INFIX_KWARG, needs_labels

        if needs_labels(model):
            # prefix_embed puts its infix tokens where the prompt ends: the first labelled position.
            inputs[INFIX_KWARG] = (labels != IGNORE_INDEX).int().argmax(dim=1)
        elif label_smoothing == 0.0 and (targets := (labels[:, 1:] != IGNORE_INDEX).sum()) > 0:
            # The LM head only where there are labels: prompt tokens need no vocabulary-sized logits.
            return causal_lm_loss(model, labels=labels, **inputs) * targets
    logits = model(**inputs, **({"use_cache": False} if "position_ids" in inputs else {})).logits.float()
    if spec.kind == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
    if spec.kind == "classification":
        weight = None if spec.class_weights is None else torch.tensor(spec.class_weights, device=logits.device)
        return F.cross_entropy(logits, labels, weight=weight, reduction="sum", label_smoothing=label_smoothing)
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# -- scoring -----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_classification(
    model: nn.Module,
    tokenizer: Any,
    spec: TaskSpec,
    examples: Sequence[Example],
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = False,
) -> list[int] | list[float]:
    """Class indices (or regression scores) for ``examples``, in their order. Batches are cut from the rows
    sorted by length, so a batch pads little (about half the work on snippets of 5-64 tokens)."""
    from tqdm.auto import tqdm

    rows = encode(spec, examples, tokenizer, cfg.max_length)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    was_training = model.training
    model.eval()
    preds: list[Any] = [None] * len(rows)
    try:
        for positions in tqdm(
            list(_chunks(order, cfg.eval_batch_size)), desc="eval", disable=not progress, leave=False
        ):
            batch = _to(collate(spec, [rows[i] for i in positions], tokenizer.pad_token_id), device)
            batch.pop("labels")
            with _autocast(device, cfg.bf16):
                logits = model(**batch).logits.float()
            if spec.kind == "regression":
                values = [spec.unscale_prediction(v) for v in logits.squeeze(-1).tolist()]
            else:
                values = logits.argmax(-1).tolist()
            for i, value in zip(positions, values):
                preds[i] = value
    finally:
        model.train(was_training)
    return preds


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    tokenizer: Any,
    spec: TaskSpec,
    items: Sequence[Any],
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = False,
) -> float:
    """Mean per-target loss (teacher forcing), the cheap validation signal for generation tasks."""
    from tqdm.auto import tqdm

    rows = encode(spec, items, tokenizer, cfg.max_length, cfg.truncation)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in tqdm(
            list(_chunks(rows, cfg.eval_batch_size)), desc="valid", disable=not progress, leave=False
        ):
            batch = _to(collate(spec, chunk, tokenizer.pad_token_id), device)
            with _autocast(device, cfg.bf16):
                total += float(loss_sum(spec, model, batch))
            count += sum(r["n_targets"] for r in chunk)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) with every prompt ending at the same position, so generation continues
    each one."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    return input_ids, attention


def _first_line(tokenizer: Any, ids: list[int], eos_id: int | None) -> str:
    """A generated continuation up to EOS, decoded, up to its first newline."""
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip()


@torch.no_grad()
def generate_e2e(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[E2EItem],
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = False,
) -> list[str]:
    """Beam-search continuations of each MR's prompt (left-padded batches), cut at EOS / newline."""
    from tqdm.auto import tqdm

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [encode_e2e_prompt(it.mr, tokenizer) for it in items]
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for chunk in tqdm(
            list(_chunks(prompts, cfg.eval_batch_size)), desc="generate", disable=not progress, leave=False
        ):
            input_ids, attention = left_padded(chunk, pad_id)
            width = input_ids.shape[1]
            with _autocast(device, cfg.bf16):
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    num_beams=cfg.num_beams,
                    length_penalty=cfg.length_penalty,
                    no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                    max_new_tokens=cfg.max_new_tokens,
                    early_stopping=True,
                    do_sample=False,
                    use_cache=True,  # training turns the model's default off
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                )
            outputs += [_first_line(tokenizer, row, eos_id) for row in generated[:, width:].tolist()]
    finally:
        model.train(was_training)
    return outputs


def encode_sft_rows(records: Sequence[SftRecord], tokenizer: Any, max_length: int,
                    truncation: str = "left") -> list[dict[str, Any]]:  # fmt: skip
    """SFT rows with ``n_targets`` (the loss terms each adds: labelled positions after the first).

    Args:
        records / tokenizer / max_length / truncation: as for :func:`lorakit.data.sft.encode_sft`.
    """
    rows = encode_sft(records, tokenizer, max_length, truncation)
    for row in rows:
        row["n_targets"] = sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)
    return rows


def generate_sft(model: nn.Module, tokenizer: Any, records: Sequence[SftRecord], cfg: TrainConfig,
                 progress: bool = False) -> list[str]:  # fmt: skip
    """The model's completion of each record's prompt (for chat: the reply in place of the last assistant
    turn), decoded with the run's beam settings and cut at EOS / end of turn."""
    from lorakit.generation import GenerationSettings, generate_ids, stop_token_ids

    rows = encode_sft(records, tokenizer, cfg.max_length, cfg.truncation)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                                  length_penalty=cfg.length_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size)
    new = generate_ids(model, [r["input_ids"][: r["prompt_length"]] for r in rows], pad_id=tokenizer.pad_token_id,
                       stop_ids=stop_token_ids(model, tokenizer), settings=settings,
                       batch_size=cfg.eval_batch_size, progress=progress)  # fmt: skip
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


def score(
    model: nn.Module,
    tokenizer: Any,
    spec: TaskSpec,
    items: Sequence[Any],
    cfg: TrainConfig,
    device: torch.device,
    *,
    progress: bool = False,
    predictions_out: list | None = None,
) -> dict[str, float]:
    """The task's metrics on ``items`` (the final evaluation), by ``spec.metric``.

    Args:
        model / tokenizer: what to score.
        spec: the task.
        items: its examples.
        cfg: evaluation settings (batch size, decoding).
        device: where to run.
        progress: show a progress bar.
        predictions_out: collects the raw outputs (class indices, scores or texts).
    """
    if not items:
        raise DataError(f"{spec.name}: nothing to evaluate (empty split)")
    if spec.kind == "preference":
        return preference_metrics(model, tokenizer, items, cfg, device, progress=progress)
    if spec.kind == "generation":
        return score_generation(model, tokenizer, spec, items, cfg, device, progress=progress,
                                predictions_out=predictions_out)  # fmt: skip
    preds = predict_classification(model, tokenizer, spec, items, cfg, device, progress=progress)
    if predictions_out is not None:
        predictions_out.extend(preds)
    result = get_metric(spec.metric)(preds, items, spec)
    # Plain floats for JSON; an undefined score (e.g. a correlation of constant predictions) stays NaN.
    return {k: float("nan") if v is None else float(v) for k, v in result.items()}


def score_generation(
    model: nn.Module,
    tokenizer: Any,
    spec: TaskSpec,
    items: Sequence[Any],
    cfg: TrainConfig,
    device: torch.device,
    *,
    progress: bool = False,
    predictions_out: list | None = None,
) -> dict[str, float]:
    """Metrics of generations against the references; SFT adds the loss and perplexity of the references
    under teacher forcing. Arguments as for ``score``."""
    result: dict[str, float] = {}
    if spec.name == "sft":  # the loss covers every answer of a multi-reference example
        loss = mean_loss(model, tokenizer, spec, expand_references(items), cfg, device, progress=progress)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        hyps = generate_sft(model, tokenizer, items, cfg, progress=progress)
    else:
        hyps = generate_e2e(model, tokenizer, items, cfg, device, progress=progress)
    if predictions_out is not None:
        predictions_out.extend(hyps)
    result.update(get_metric(spec.metric)(hyps, items, spec))
    return result


def validate(
    model: nn.Module,
    tokenizer: Any,
    spec: TaskSpec,
    items: Sequence[Any],
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = False,
) -> dict[str, float]:
    """The signal logged during training: task metrics for classification, loss for generation (beam search
    over the validation set at every interval would dominate the run's time)."""
    if spec.kind == "generation":
        loss = mean_loss(model, tokenizer, spec, items, cfg, device, progress=progress)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if spec.kind == "preference":
        return preference_metrics(model, tokenizer, items, cfg, device, progress=progress)
    return score(model, tokenizer, spec, items, cfg, device, progress=progress)
