"""Preference data for DPO / ORPO: ``{"prompt", "chosen", "rejected"}`` records from JSONL, CSV or TSV.

Each field is text (the answers follow the prompt verbatim, as SFT completions do), or, in TRL's
conversational form, a list of ``{role, content}`` messages: the prompt's turns end with a user turn and
each answer is the assistant's reply. Rows are encoded with the SFT truncation policy: a pair too long for
``max_length`` loses prompt tokens from the left (the same ones for both answers), never answer tokens.
Every malformed record is a :class:`DataError` naming the file, the line and the problem.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.collate import IGNORE_INDEX
from lorakit.data.files import read_records
from lorakit.data.sft import SFT_SUFFIXES, SftRecord, _parse_messages, _pieces
from lorakit.data.splits import carve_valid
from lorakit.data.text import DataError

__all__ = [
    "PREFERENCE_FIELDS", "PreferenceRecord", "collate_preference", "encode_preference", "find_preference_file",
    "load_preference", "preference_splits",
]  # fmt: skip

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
Messages = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair; ``source`` is ``"file, line N"``. Text records have str fields, chat records
    message tuples (the prompt's turns; each answer's assistant turns)."""

    source: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    def key(self) -> str:
        """What the pair is conditioned on; splits are carved disjointly by it."""
        return self.prompt if isinstance(self.prompt, str) else repr(self.prompt)

    def as_sft(self, answer: str | Messages) -> SftRecord:
        """The prompt followed by ``answer``, as the SFT record it would be (same tokens, same targets)."""
        if isinstance(self.prompt, str):
            return SftRecord(self.source, prompt=self.prompt, completion=answer)  # type: ignore[arg-type]
        return SftRecord(self.source, messages=(*self.prompt, *answer))  # type: ignore[misc]


def _chat_field(rec: dict[str, Any], name: str, where: str) -> Messages:
    value = rec[name]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name!r} must be text or a non-empty list of {{role, content}} messages")
    if name == "prompt":
        # _parse_messages wants a conversation ending with the assistant: check the prompt with a stand-in reply.
        return _parse_messages([*value, {"role": "assistant", "content": "x"}], where, name)[:-1]
    roles = {m.get("role") for m in value if isinstance(m, dict)}
    if roles != {"assistant"}:
        raise DataError(f"{where}: {name!r} must hold the assistant's reply only, got roles {sorted(map(str, roles))}")
    return _parse_messages([{"role": "user", "content": "x"}, *value], where, name)[1:]


def _parse_record(rec: dict[str, Any], where: str) -> PreferenceRecord:
    missing = [f for f in PREFERENCE_FIELDS if f not in rec or rec[f] is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; a preference record needs "
                        f"{list(PREFERENCE_FIELDS)} (present: {sorted(rec)})")  # fmt: skip
    chat = [isinstance(rec[f], list) for f in PREFERENCE_FIELDS]
    if any(chat) and not all(chat):
        raise DataError(f"{where}: mixes text and chat messages; give all of {list(PREFERENCE_FIELDS)} as one form")
    if all(chat):
        values = [_chat_field(rec, f, where) for f in PREFERENCE_FIELDS]
    else:
        values = [rec[f] for f in PREFERENCE_FIELDS]
        for name, val in zip(PREFERENCE_FIELDS, values):
            if not isinstance(val, str):
                raise DataError(f"{where}: {name!r} must be text or chat messages, got {type(val).__name__}")
        for name in ("chosen", "rejected"):
            if not rec[name].strip():
                raise DataError(f"{where}: empty {name!r} answer (nothing to compare)")
    if values[1] == values[2]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so the pair states no preference")
    return PreferenceRecord(where, *values)


def load_preference(path: str | Path) -> list[PreferenceRecord]:
    """Read a preference file of any type the SFT readers take (``lorakit.data.files.read_records``):
    JSONL or a JSON array (text or chat records), CSV/TSV (text, with a header naming prompt, chosen and
    rejected), Parquet or Arrow.

    Args:
        path: the file.
    """
    path = Path(path)
    out = [_parse_record(rec, where) for where, rec in read_records(path, list(PREFERENCE_FIELDS))]
    if not out:
        raise DataError(f"{path}: no records (the file is empty)")
    return out


def find_preference_file(folder: Path, stems: Sequence[str]) -> Path | None:
    """The first ``folder/<stem><suffix>`` that exists, stems in order of preference."""
    for stem in stems:
        for suffix in SFT_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def preference_splits(
    files: dict[str, Path | None], seed: int, valid_fraction: float = 0.1
) -> dict[str, list[PreferenceRecord]]:
    """``{"train", "valid", "test"}`` pairs: a missing valid file is carved out of train, disjoint by prompt
    (with a warning); a missing test file falls back to the valid split.

    Args:
        files: role -> file (None when absent); ``train`` is required.
        seed: picks the carved prompts.
        valid_fraction: share of train's distinct prompts carved as valid.
    """
    if files.get("train") is None:
        raise DataError("preference: no train file (train.jsonl/.csv/.tsv in --data, or --train-file)")
    train = load_preference(files["train"])  # type: ignore[arg-type]
    if files.get("valid") is not None:
        valid = load_preference(files["valid"])  # type: ignore[arg-type]
    else:
        carved = carve_valid(train, valid_fraction, seed, task="preference", source=str(files["train"]),
                             key=PreferenceRecord.key)
        train, valid = carved.train, carved.valid
        warnings.warn(carved.note, UserWarning, stacklevel=2)
    test = load_preference(files["test"]) if files.get("test") is not None else valid  # type: ignore[arg-type]
    return {"train": train, "valid": valid, "test": test}


# -- encoding ----------------------------------------------------------------------------------------------
def _flatten(pieces: list[tuple[list[int], bool]]) -> tuple[list[int], list[int], int]:
    """(ids, labels, context): ``context`` is the number of tokens before the first target."""
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if target else IGNORE_INDEX for piece, target in pieces for t in piece]
    context = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return ids, labels, context


def _encode_pair(record: PreferenceRecord, tokenizer: Any, max_length: int) -> tuple[dict[str, Any], bool]:
    """One row (both answers after the same prompt) and whether the prompt was cut."""
    chosen = _flatten(_pieces(record.as_sft(record.chosen), tokenizer))
    rejected = _flatten(_pieces(record.as_sft(record.rejected), tokenizer))
    excess = max(len(chosen[0]), len(rejected[0])) - max_length
    # One context token always stays: position 0 predicts nothing.
    room = min(chosen[2], rejected[2]) - 1
    if excess > room:
        longest = max(len(chosen[0]) - chosen[2], len(rejected[0]) - rejected[2])
        raise DataError(
            f"{record.source}: no room for the answers at max_length={max_length}: the longer answer is "
            f"{longest} tokens after a prompt of {min(chosen[2], rejected[2])}; answers are never cut, so raise "
            "--max-length or shorten the record"
        )
    cut = max(excess, 0)
    row = {"chosen_input_ids": chosen[0][cut:], "chosen_labels": chosen[1][cut:],
           "rejected_input_ids": rejected[0][cut:], "rejected_labels": rejected[1][cut:]}  # fmt: skip
    # The sampler groups rows by input_ids' length: the longer answer decides a pair's padding.
    row["input_ids"] = max(row["chosen_input_ids"], row["rejected_input_ids"], key=len)
    row["n_targets"] = 1  # the loss is a mean over pairs
    return row, cut > 0


def encode_preference(records: Sequence[PreferenceRecord], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Rows ``chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels`` (labels -100 off the
    answers), ``input_ids`` (the longer sequence, for length grouping) and ``n_targets`` = 1.

    Args:
        records: loaded pairs.
        tokenizer: a Hugging Face tokenizer (with a chat template for chat records).
        max_length: the longest sequence, in tokens; prompts are cut from the left to fit.
    """
    rows, cut = [], []
    for record in records:
        row, was_cut = _encode_pair(record, tokenizer, max_length)
        rows.append(row)
        if was_cut:
            cut.append(record.source)
    if cut:
        warnings.warn(f"preference: cut the prompt of {len(cut)} of {len(records)} pairs from the left to fit "
                      f"max_length={max_length} (first: {cut[0]}); answers are kept whole",
                      UserWarning, stacklevel=2)  # fmt: skip
    return rows


def collate_preference(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One right-padded batch of 2B sequences: the B chosen, then the B rejected (one forward for both).

    Args:
        rows: encoded pairs.
        pad_token_id: the padding id (pad positions get label -100 and attention 0).
    """
    import torch

    seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    seqs += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
