"""The causal-LM tasks beyond E2E: ``webnlg`` and ``dart`` (data-to-text, scored with BLEU/METEOR/TER) and
``sft`` (prompt/completion or chat records, scored with validation loss, perplexity and BLEU/METEOR/TER of
generated completions). ``evaluate.py`` dispatches here; the trainer treats them as any generation task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.sft import SftRecord, encode_sft, find_sft_file, sft_splits
from lorakit.data.text import DataError
from lorakit.data.webnlg import d2t_splits, load_dart, load_webnlg
from lorakit.errors import ConfigError
from lorakit.training.config import TrainConfig

NLG_TASKS = ("webnlg", "dart", "sft")
D2T_ROLE_FILES = {"train": ("train",), "valid": ("valid", "dev"), "test": ("test",)}


def _explicit(cfg: TrainConfig, folder: Path | None) -> dict[str, Path]:
    out = {}
    for role, given in (("train", cfg.train_file), ("valid", cfg.valid_file), ("test", cfg.eval_file)):
        if given:
            p = Path(given)
            p = p if p.is_absolute() or p.exists() or folder is None else folder / p
            if not p.is_file():
                raise DataError(f"{role} file {p} not found")
            out[role] = p
    return out


def _d2t_files(cfg: TrainConfig) -> dict[str, Path]:
    """Files per role: explicit flags, else ``train/valid|dev/test.json`` in --data (or --data the file)."""
    given = Path(cfg.data) if cfg.data else None
    if given is not None and not given.exists():
        raise DataError(f"data path {given} not found")
    folder = given.parent if given is not None and given.is_file() else given
    files = _explicit(cfg, folder)
    if given is not None and given.is_file() and not files:
        return {"valid": given}  # one file (the LoRA repo ships dev.json): every split is carved from it
    for role, stems in D2T_ROLE_FILES.items():
        found = [folder / f"{s}.json" for s in stems] if folder is not None else []
        hit = next((p for p in found if p.is_file()), None)
        if role not in files and hit is not None:
            files[role] = hit
    if not files:
        raise DataError(f"no {cfg.task} data in {folder}: expected train.json / dev.json / test.json")
    return files


def _load_d2t(cfg: TrainConfig) -> dict[str, list[Any]]:
    files = _d2t_files(cfg)
    loader = load_webnlg if cfg.task.lower() == "webnlg" else load_dart
    return d2t_splits({r: loader(p) for r, p in files.items()}, files, seed=cfg.split_seed)


def _sft_files(cfg: TrainConfig) -> dict[str, Path | None]:
    given = Path(cfg.data) if cfg.data else None
    if given is not None and not given.exists():
        raise DataError(f"data path {given} not found")
    folder = given.parent if given is not None and given.is_file() else given
    files: dict[str, Path | None] = dict(_explicit(cfg, folder))
    if given is not None and given.is_file():
        files.setdefault("train", given)
    stems = {"train": ("train",), "valid": ("valid", "dev", "validation"), "test": ("test",)}
    for role, names in stems.items():
        if role not in files and folder is not None:
            files[role] = find_sft_file(folder, names)
    return files


def load_nlg_task(cfg: TrainConfig, roles: Sequence[str]) -> Any:
    """TaskData for webnlg / dart / sft; every data problem is raised here, before a model is loaded."""
    from lorakit.training.evaluate import TaskData, TaskSpec, subsample

    task = cfg.task.lower()
    if task == "sft":
        fields = (cfg.prompt_field, cfg.completion_field, cfg.messages_field)
        splits: dict[str, list[Any]] = sft_splits(_sft_files(cfg), cfg.split_seed, fields)
    else:
        splits = _load_d2t(cfg)
    eval_role = cfg.eval_split or "test"
    if eval_role not in splits:
        raise ConfigError(f"eval_split for {task} must be one of {list(splits)}, got {eval_role!r}")
    out = TaskData(TaskSpec(task, "generation", "causal-lm"))
    if "train" in roles:
        train = splits["train"]
        if task != "sft":  # one training example per (input, reference) pair, as for E2E
            train = [type(it)(it.mr, [ref], it.category, it.seen) for it in train for ref in it.references]
        out.train = subsample(train, cfg.max_train_samples, cfg.split_seed)
    if "valid" in roles:
        out.valid = subsample(splits["valid"], cfg.max_eval_samples, cfg.split_seed)
    if "eval" in roles:
        out.eval = subsample(splits[eval_role], cfg.max_eval_samples, cfg.split_seed)
    return out


def encode_sft_rows(records: Sequence[SftRecord], tokenizer: Any, max_length: int,
                    truncation: str = "left") -> list[dict[str, Any]]:  # fmt: skip
    """SFT rows with ``n_targets`` (the loss terms each adds: labelled positions after the first).

    Args:
        records / tokenizer / max_length / truncation: as for :func:`lorakit.data.sft.encode_sft`.
    """
    rows = encode_sft(records, tokenizer, max_length, truncation)
    for row in rows:
        row["n_targets"] = sum(1 for label in row["labels"][1:] if label != -100)
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


def score_nlg(
    model: nn.Module,
    tokenizer: Any,
    spec: Any,
    items: Sequence[Any],
    cfg: TrainConfig,
    device: torch.device,
    *,
    progress: bool = False,
    predictions_out: list | None = None,
) -> dict[str, float]:
    """Final scores: BLEU/METEOR/TER of generations against the references (WebNLG: also per seen/unseen
    group); SFT adds the loss and perplexity of the references under teacher forcing."""
    from lorakit.metrics.d2t import d2t_metrics
    from lorakit.training.evaluate import generate_e2e, mean_loss

    result: dict[str, float] = {}
    if spec.name == "sft":
        loss = mean_loss(model, tokenizer, spec, items, cfg, device, progress=progress)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        hyps = generate_sft(model, tokenizer, items, cfg, progress=progress)
    else:
        hyps = generate_e2e(model, tokenizer, items, cfg, device, progress=progress)
    if predictions_out is not None:
        predictions_out.extend(hyps)
    seen = [it.seen for it in items] if spec.name == "webnlg" else None
    # An empty hypothesis would make several scorers fail; score it as a single unknown token.
    result.update(d2t_metrics([h or "<empty>" for h in hyps], [it.references for it in items], seen=seen))
    return result

