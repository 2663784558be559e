"""Tokenization and dynamic-padding collation for classification and E2E causal-LM training.

Encoders return a dict of equal-length lists (one entry per example, unpadded); ``encoded_rows``
turns it into per-example dicts for a ``DataLoader``, whose ``collate_fn`` pads each batch only to
that batch's longest sequence.

Tokenizer interface (a Hugging Face tokenizer satisfies it): ``tokenizer(texts, [text_pair=...],
truncation=..., max_length=..., add_special_tokens=...)`` returning a mapping with ``input_ids``
(and ``attention_mask``/``token_type_ids`` for classification), plus ``eos_token_id``/``bos_token_id``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.data.e2e import E2EItem, e2e_prompt, e2e_training_pairs
from lorakit.data.text import DataError, Example
from lorakit.lora.kernels import IGNORE_INDEX  # one definition, beside the loss that skips it

__all__ = [
    "IGNORE_INDEX",
    "collate_causal_lm",
    "collate_classification",
    "encode_classification",
    "encode_e2e_for_training",
    "encode_e2e_prompt",
    "encoded_rows",
]


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an int >= 2, got {max_length!r}")


def encode_classification(examples: Sequence[Example], tokenizer: Any, max_length: int) -> dict[str, list]:
    """Tokenize examples (with their pair text, if any) truncated to ``max_length`` tokens.

    Returns lists ``input_ids``, ``attention_mask``, ``labels`` and, when the tokenizer produces
    them (BERT), ``token_type_ids``. Labels stay int for classification, float for regression.
    """
    _check_max_length(max_length)
    if not examples:
        raise DataError("encode_classification: no examples to encode")
    with_pair = [ex.text_pair is not None for ex in examples]
    if any(with_pair) and not all(with_pair):
        raise DataError("encode_classification: some examples have a text_pair and some do not")
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples] if with_pair[0] else None
    enc = tokenizer(texts, text_pair=pairs, truncation=True, max_length=max_length)
    out: dict[str, list] = {
        "input_ids": [list(ids) for ids in enc["input_ids"]],
        "attention_mask": [list(m) for m in enc["attention_mask"]],
    }
    if "token_type_ids" in enc:
        out["token_type_ids"] = [list(t) for t in enc["token_type_ids"]]
    out["labels"] = [ex.label for ex in examples]
    return out


def encoded_rows(encoded: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Turn a dict of per-example lists into a list of per-example dicts (a map-style dataset)."""
    lengths = {k: len(v) for k, v in encoded.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"encoded fields have different lengths: {lengths}")
    keys = list(encoded)
    return [dict(zip(keys, vals)) for vals in zip(*(encoded[k] for k in keys))]


def _pad(seqs: Sequence[Sequence[int]], value: int):
    import torch

    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def collate_classification(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch of encoded rows to its longest sequence and stack into tensors.

    ``input_ids`` pad with ``pad_token_id``; ``attention_mask`` and ``token_type_ids`` with 0.
    ``labels`` become int64 when all are ints, else float32 (regression).
    """
    import torch

    if not batch:
        raise DataError("collate_classification: empty batch")
    out = {
        "input_ids": _pad([r["input_ids"] for r in batch], pad_token_id),
        "attention_mask": _pad([r["attention_mask"] for r in batch], 0),
    }
    if "token_type_ids" in batch[0]:
        out["token_type_ids"] = _pad([r["token_type_ids"] for r in batch], 0)
    labels = [r["labels"] for r in batch]
    is_int = all(isinstance(x, int) and not isinstance(x, bool) for x in labels)
    out["labels"] = torch.tensor(labels, dtype=torch.long if is_int else torch.float32)
    return out


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # No special tokens: a causal LM's input is exactly prompt + target (+ eos added by us).
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos(tokenizer: Any, add_bos: bool) -> list[int]:
    if not add_bos:
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError("add_bos=True but the tokenizer has no bos_token_id")
    return [int(bos)]


def encode_e2e_prompt(mr: str, tokenizer: Any, add_bos: bool = False) -> list[int]:
    """Token ids of ``e2e_prompt(mr)`` exactly as the training encoder builds them (for generation)."""
    return _bos(tokenizer, add_bos) + _ids(tokenizer, [e2e_prompt(mr)])[0]


def encode_e2e_for_training(
    items: Sequence[E2EItem],
    tokenizer: Any,
    max_length: int,
    *,
    eos_token_id: int | None = None,
    add_bos: bool = False,
    truncation: str = "left",
) -> dict[str, list]:
    """Encode every (MR, reference) pair as ``prompt + " " + reference + eos`` for causal-LM training.

    ``labels`` are ``-100`` on the prompt tokens so the loss covers only the reference and eos.
    Prompt and target are tokenized separately, the same way ``encode_e2e_prompt`` does at
    generation time. A pair longer than ``max_length`` follows SFT's rule: the prompt loses tokens from the
    left (one always stays) and a UserWarning counts the pairs cut; the reference is never cut, so a
    reference that cannot fit raises :class:`DataError`, as does any over-long pair with
    ``truncation="refuse"``. ``eos_token_id`` defaults to ``tokenizer.eos_token_id``.
    """
    _check_max_length(max_length)
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; pass eos_token_id= explicitly")
    pairs = e2e_training_pairs(items)
    if not pairs:
        raise DataError("encode_e2e_for_training: no (MR, reference) pairs to encode")

    mrs = list(dict.fromkeys(mr for mr, _ in pairs))
    bos = _bos(tokenizer, add_bos)
    prompt_ids = {mr: bos + ids for mr, ids in zip(mrs, _ids(tokenizer, [e2e_prompt(m) for m in mrs]))}
    target_ids = _ids(tokenizer, [f" {ref.strip()}" for _, ref in pairs])

    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    cut: list[str] = []
    for (mr, _), tgt in zip(pairs, target_ids):
        prompt, target = _fit_pair(prompt_ids[mr], [*tgt, int(eos)], max_length, truncation, mr)
        if len(prompt) < len(prompt_ids[mr]):
            cut.append(mr)
        out["input_ids"].append(prompt + target)
        out["attention_mask"].append([1] * (len(prompt) + len(target)))
        out["labels"].append([IGNORE_INDEX] * len(prompt) + target)
    if cut:
        warnings.warn(
            f"cut the input of {len(cut)} of {len(pairs)} (input, reference) pairs from the left to fit "
            f"max_length={max_length} (first: {cut[0][:80]!r}); references are kept whole",
            UserWarning,
            stacklevel=2,
        )
    return out


def _fit_pair(
    prompt: list[int], target: list[int], max_length: int, truncation: str, mr: str
) -> tuple[list[int], list[int]]:
    """(prompt, target) within ``max_length``: the prompt is cut from the left, keeping one token."""
    excess = len(prompt) + len(target) - max_length
    if excess <= 0:
        return prompt, target
    if truncation == "refuse":
        raise DataError(
            f"an (input, reference) pair is {len(prompt) + len(target)} tokens, over max_length={max_length}, "
            f"and truncation is 'refuse': {mr[:80]!r}; raise --max-length or use --truncation left"
        )
    if excess > len(prompt) - 1:
        raise DataError(
            f"a reference of {len(target)} tokens (with EOS) cannot fit max_length={max_length} even with "
            f"its input cut to one token: {mr[:80]!r}; raise --max-length"
        )
    return prompt[excess:], target


def collate_causal_lm(
    batch: Sequence[Mapping[str, Any]], pad_token_id: int, label_pad_id: int = IGNORE_INDEX
) -> dict[str, Any]:
    """Right-pad ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0), ``labels`` (-100)."""
    if not batch:
        raise DataError("collate_causal_lm: empty batch")
    return {
        "input_ids": _pad([r["input_ids"] for r in batch], pad_token_id),
        "attention_mask": _pad([r["attention_mask"] for r in batch], 0),
        "labels": _pad([r["labels"] for r in batch], label_pad_id),
    }
