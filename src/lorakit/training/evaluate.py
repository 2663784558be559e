"""Tasks for training and evaluation: what a task is, its data splits, and how it is scored.

Three kinds of task:

* GLUE (``sst2 mrpc cola rte stsb qnli qqp mnli``): sequence classification (STS-B: regression) from
  GLUE's TSV files, scored with GLUE's metrics on ``dev.tsv``.
* ``text``: classification from the user's CSV/TSV/JSONL files, scored with accuracy and macro-F1.
* ``e2e``: a causal LM continues ``"<MR> ||"`` with the reference; scored by beam-search generation
  (left-padded batches) with BLEU, NIST, METEOR, ROUGE-L and CIDEr against all references of each MR.
* ``webnlg``, ``dart`` and ``sft``: causal-LM tasks loaded and scored in ``nlg_tasks.py``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
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
    e2e_splits,
    encode_classification,
    encode_e2e_for_training,
    encode_e2e_prompt,
    encoded_rows,
    get_glue_task,
    glue_split_exists,
    glue_task_names,
    load_glue,
    load_text_classification,
)
from lorakit.errors import ConfigError
from lorakit.training.config import TrainConfig
from lorakit.training.nlg_tasks import NLG_TASKS, encode_sft_rows, load_nlg_task, score_nlg

TEXT_TASKS = ("text", "text-classification")
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


@dataclass
class TaskSpec:
    """What the trainer needs to know about a task."""

    name: str  # canonical: a GLUE name, "text" or "e2e"
    kind: str  # "classification", "regression" or "generation"
    model_task: str  # lorakit.models.load_model task: "seq-cls" or "causal-lm"
    num_labels: int | None = None
    label_names: list[str] = field(default_factory=list)
    # Regression: the score range, mapped to [0, 1] for training and back for predictions. An unscaled
    # 0-5 target makes the tanh-bounded BERT pooler saturate and the model collapse onto the mean score.
    target_range: tuple[float, float] | None = None
    # Classification: per-class loss weights (None: plain cross-entropy); see ``balanced_class_weights``.
    class_weights: list[float] | None = None
    metrics: tuple[str, ...] = ()  # GLUE: the task's official metrics

    def scale_target(self, value: float) -> float:
        """A regression label in the model's [0, 1] training scale (identity without a range)."""
        if self.target_range is None:
            return float(value)
        lo, hi = self.target_range
        return (float(value) - lo) / (hi - lo)

    def unscale_prediction(self, value: float) -> float:
        """A model output back in the task's own score range (the inverse of ``scale_target``)."""
        if self.target_range is None:
            return float(value)
        lo, hi = self.target_range
        return float(value) * (hi - lo) + lo

    @property
    def is_glue(self) -> bool:
        return self.name in glue_task_names()


@dataclass
class TaskData:
    """Raw examples per role: ``train`` (fit), ``valid`` (scored during training), ``eval`` (final score)."""

    spec: TaskSpec
    train: list[Any] = field(default_factory=list)
    valid: list[Any] = field(default_factory=list)
    eval: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how splits were made, shown to the user


# -- loading -----------------------------------------------------------------------------------------------
def subsample(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """A fixed random subset (original order kept); the same for every training seed."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _find_text_file(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in TEXT_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def load_task(cfg: TrainConfig, roles: Sequence[str] = ("train", "valid", "eval")) -> TaskData:
    """Load and check the data of ``roles``; every problem is a DataError/ConfigError raised here,
    before a model is loaded or a step is taken."""
    task = cfg.task.lower()
    if task in TEXT_TASKS:
        return _cap_valid(_load_text(cfg, roles), cfg)
    if task == "e2e":
        return _cap_valid(_load_e2e(cfg, roles), cfg)
    if task in NLG_TASKS:  # webnlg, dart, sft
        return _cap_valid(load_nlg_task(cfg, roles), cfg)
    try:
        glue = get_glue_task(task)
    except DataError:
        raise ConfigError(
            f"unknown task {cfg.task!r}; choose a GLUE task ({', '.join(glue_task_names())}), 'text', 'e2e', "
            "'webnlg', 'dart' or 'sft'"
        ) from None
    for name in ("train_file", "valid_file", "eval_file"):
        if getattr(cfg, name):
            raise ConfigError(f"{name} is not used for GLUE tasks: point --data at the task folder instead")
    spec = TaskSpec(
        name=glue.name,
        kind="regression" if glue.is_regression else "classification",
        model_task="seq-cls",
        num_labels=glue.num_labels,
        label_names=list(glue.labels),
        target_range=glue.score_range,
        metrics=glue.metrics,
    )
    eval_split = cfg.eval_split or glue.splits[1]  # dev (MNLI: dev_matched)
    out = TaskData(spec)
    train, scored = _glue_train_and_scored(glue.name, cfg, eval_split, roles, out.notes)
    if "train" in roles:
        out.train = subsample(train, cfg.max_train_samples, cfg.split_seed)
    # GLUE reports dev; selecting on dev is what the paper and GLUE baselines do.
    scored = subsample(scored, cfg.max_eval_samples, cfg.split_seed)
    out.valid = scored if "valid" in roles else []
    out.eval = scored if "eval" in roles else []
    return out


GLUE_CARVE_FRACTION = 0.1  # of train, held out when a task folder has no dev file (STS-B here)
GLUE_CARVE_MAX = 1000


def _glue_train_and_scored(
    task: str, cfg: TrainConfig, eval_split: str, roles: Sequence[str], notes: list[str]
) -> tuple[list[Example], list[Example]]:
    """(train, scored) examples, each read only if ``roles`` need it. Without a file for ``eval_split``, a
    fixed held-out part of train (seeded by ``split_seed``) is scored and left out of training, so the two
    never overlap."""
    wants_train, wants_scored = "train" in roles, "valid" in roles or "eval" in roles
    if cfg.eval_split or glue_split_exists(task, cfg.data, eval_split):  # a named split must exist
        train = load_glue(task, cfg.data, "train") if wants_train else []
        return train, load_glue(task, cfg.data, eval_split) if wants_scored else []
    train = load_glue(task, cfg.data, "train")
    n_held = min(GLUE_CARVE_MAX, max(1, round(GLUE_CARVE_FRACTION * len(train))))
    if len(train) - n_held < 1:
        raise DataError(f"{task}: {len(train)} training example(s) are too few to carve a {eval_split} split")
    held = set(random.Random(cfg.split_seed).sample(range(len(train)), n_held))
    notes.append(
        f"no {task} {eval_split} file in {cfg.data}: scoring {n_held} examples held out of train.tsv "
        f"(split_seed {cfg.split_seed}), training on the other {len(train) - n_held}"
    )
    return [ex for i, ex in enumerate(train) if i not in held], [ex for i, ex in enumerate(train) if i in held]


def _cap_valid(data: TaskData, cfg: TrainConfig) -> TaskData:
    """Bound the validation split by ``max_valid_samples`` examples: it is scored at every interval, so an
    uncapped valid file (E2E's has 547 MRs, 4,672 references) can cost more than the training itself.
    Generation tasks validate on the teacher-forced loss of (input, reference) pairs, so pairs are counted."""
    if cfg.max_valid_samples is None:
        return data
    valid = data.valid
    if data.spec.kind == "generation" and valid and isinstance(valid[0], E2EItem):
        valid = [replace(it, references=[ref]) for it in valid for ref in it.references]
    if len(valid) > cfg.max_valid_samples:
        data.valid = subsample(valid, cfg.max_valid_samples, cfg.split_seed)
    return data


def _load_text(cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    given = Path(cfg.data) if cfg.data else None
    if given is not None and not given.exists():
        raise DataError(f"data path {given} not found")
    # --data may be a folder (train.csv, dev.csv …) or the train file itself.
    folder = given.parent if given is not None and given.is_file() else given

    def pick(explicit: str | None, stems: Sequence[str]) -> Path | None:
        if explicit:
            p = Path(explicit)
            return p if p.is_absolute() or p.exists() or folder is None else folder / p
        return _find_text_file(folder, stems) if folder is not None else None

    train_path = given if given is not None and given.is_file() else pick(cfg.train_file, ("train",))
    if train_path is None:
        raise DataError(f"no train file in {folder}: expected train.csv/.tsv/.jsonl (or --train-file)")
    eval_path = pick(cfg.eval_file, ("test", "dev", "valid", "validation"))
    valid_path = pick(cfg.valid_file, ("dev", "valid", "validation")) or eval_path
    if ("eval" in roles or "valid" in roles) and eval_path is None:
        raise DataError(
            f"no evaluation file in {folder}: expected test/dev/valid .csv/.tsv/.jsonl (or --eval-file)"
        )

    def read(path: Path, names: list[str] | None) -> tuple[list[Example], list[str]]:
        return load_text_classification(path, cfg.text_column, cfg.text_pair_column, cfg.label_column, names)

    names = cfg.label_names
    train: list[Example] = []
    if "train" in roles or names is None:
        train, names = read(train_path, names)
    if names is not None and len(names) < 2:
        raise DataError(f"{train_path}: only one label ({names}); classification needs at least two")
    spec = TaskSpec(
        "text", "classification", "seq-cls", num_labels=len(names or []), label_names=list(names or [])
    )
    out = TaskData(
        spec, train=subsample(train, cfg.max_train_samples, cfg.split_seed) if "train" in roles else []
    )
    if "eval" in roles:
        out.eval = subsample(read(eval_path, names)[0], cfg.max_eval_samples, cfg.split_seed)  # type: ignore[arg-type]
    if "valid" in roles:
        out.valid = subsample(read(valid_path, names)[0], cfg.max_eval_samples, cfg.split_seed)  # type: ignore[arg-type]
    return out


def _load_e2e(cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    splits = e2e_splits(
        cfg.data,
        seed=cfg.split_seed,
        train_file=cfg.train_file,
        valid_file=cfg.valid_file,
        test_file=cfg.eval_file,
    )
    eval_role = cfg.eval_split or "test"
    if eval_role not in splits:
        raise ConfigError(f"eval_split for e2e must be one of {list(splits)}, got {eval_role!r}")
    out = TaskData(TaskSpec("e2e", "generation", "causal-lm"))
    if "train" in roles:
        # One training example per (MR, reference) pair; max_train_samples counts pairs.
        pairs = [E2EItem(it.mr, [ref]) for it in splits["train"] for ref in it.references]
        out.train = subsample(pairs, cfg.max_train_samples, cfg.split_seed)
    if "valid" in roles:
        out.valid = subsample(splits["valid"], cfg.max_eval_samples, cfg.split_seed)
    if "eval" in roles:
        out.eval = subsample(splits[eval_role], cfg.max_eval_samples, cfg.split_seed)
    for role in roles:
        if not getattr(out, role):
            raise DataError(f"e2e: the {role} split is empty")
    return out


# Metrics that score a majority-class predictor at 0 whatever the class balance: a model trained on the
# plain loss for them sits at that 0 for most of a short run (CoLA, ~70 % acceptable).
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
    if spec.name == "sft":
        return encode_sft_rows(items, tokenizer, max_length, truncation)
    if spec.kind == "generation":
        rows = encoded_rows(encode_e2e_for_training(items, tokenizer, max_length))
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


def collate(spec: TaskSpec, rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    rows = [{k: v for k, v in r.items() if k != "n_targets"} for r in rows]
    if spec.kind == "generation":
        return collate_causal_lm(rows, pad_token_id)
    return collate_classification(rows, pad_token_id)


def loss_sum(
    spec: TaskSpec, model: nn.Module, batch: dict[str, Tensor], label_smoothing: float = 0.0
) -> Tensor:
    """Sum (not mean) of per-target losses, so the trainer can normalise by the global target count."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if spec.kind == "generation":
        from lorakit.fast import causal_lm_loss
        from lorakit.methods.prefix import INFIX_KWARG, needs_labels

        if needs_labels(model):
            # prefix_embed puts its infix tokens where the prompt ends: the first labelled position.
            inputs[INFIX_KWARG] = (labels != IGNORE_INDEX).int().argmax(dim=1)
        elif label_smoothing == 0.0 and (targets := (labels[:, 1:] != IGNORE_INDEX).sum()) > 0:
            # The LM head only where there are labels: prompt tokens need no vocabulary-sized logits.
            return causal_lm_loss(model, labels=labels, **inputs) * targets
    logits = model(**inputs).logits.float()
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
def text_metrics(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean of per-class F1 over the label set) for text classification."""
    from lorakit.metrics.glue import accuracy, binary_f1

    result = {"accuracy": accuracy(predictions, references)}
    result["macro_f1"] = float(
        np.mean([binary_f1(predictions, references, positive=c) for c in range(num_labels)])
    )
    return result


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
    """Class indices (or regression scores) for ``examples``."""
    from tqdm.auto import tqdm

    rows = encode(spec, examples, tokenizer, cfg.max_length)
    was_training = model.training
    model.eval()
    preds: list[Any] = []
    try:
        for chunk in tqdm(
            list(_chunks(rows, cfg.eval_batch_size)), desc="eval", disable=not progress, leave=False
        ):
            batch = _to(collate(spec, chunk, tokenizer.pad_token_id), device)
            batch.pop("labels")
            with _autocast(device, cfg.bf16):
                logits = model(**batch).logits.float()
            if spec.kind == "regression":
                preds += [spec.unscale_prediction(v) for v in logits.squeeze(-1).tolist()]
            else:
                preds += logits.argmax(-1).tolist()
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
            width = max(len(p) for p in chunk)
            # Left padding: every prompt ends at the same position, so generation continues each one.
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p) :] = torch.tensor(p)
                attention[i, width - len(p) :] = 1
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
            for row in generated[:, width:].tolist():
                if eos_id in row:
                    row = row[: row.index(eos_id)]
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs.append(text.strip().split("\n")[0].strip())
    finally:
        model.train(was_training)
    return outputs


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
    """The task's metrics on ``items`` (the final evaluation). ``predictions_out`` collects raw outputs."""
    if not items:
        raise DataError(f"{spec.name}: nothing to evaluate (empty split)")
    if spec.name in NLG_TASKS:
        return score_nlg(model, tokenizer, spec, items, cfg, device, progress=progress,
                         predictions_out=predictions_out)  # fmt: skip
    if spec.kind == "generation":
        from lorakit.metrics.nlg import nlg_metrics

        hyps = generate_e2e(model, tokenizer, items, cfg, device, progress=progress)
        if predictions_out is not None:
            predictions_out.extend(hyps)
        # An empty hypothesis would make several scorers fail; score it as a single unknown token.
        return nlg_metrics([h or "<empty>" for h in hyps], [it.references for it in items])
    preds = predict_classification(model, tokenizer, spec, items, cfg, device, progress=progress)
    if predictions_out is not None:
        predictions_out.extend(preds)
    refs = [ex.label for ex in items]
    if spec.is_glue:
        from lorakit.metrics.glue import glue_metrics

        result = glue_metrics(spec.name, preds, refs)
    else:
        result = text_metrics(preds, refs, spec.num_labels or 2)
    # Plain floats for JSON; an undefined score (e.g. a correlation of constant predictions) stays NaN.
    return {k: float("nan") if v is None else float(v) for k, v in result.items()}


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
    return score(model, tokenizer, spec, items, cfg, device, progress=progress)
