"""Sample packing for causal-LM training: several encoded records share one row of ``max_length`` tokens
and stay apart.

* ``best_fit_decreasing`` puts records into rows (bins): longest first, each into the fullest row it still
  fits, a new row when none has room. A record is never split; one longer than the row is an error (the
  encoders already cut records to ``max_length`` by their truncation policy).
* ``pack_rows`` concatenates a bin's records into one row. ``position_ids`` restart at 0 for each record,
  which is how transformers' attention-mask builder (``masking_utils.find_packed_sequence_indices``) tells
  the records apart and makes the causal mask block-diagonal (the padding-free path TRL uses); the label
  of each record's first token becomes ``IGNORE_INDEX``, so no record is trained to predict the next one
  and the targets are exactly those of the records unpacked (a label at position 0 never counts).
* ``collate_packed`` pads the rows of a micro-batch to the longest; padding is a record of its own
  (positions from 0, no labels), so it is attended by nothing else.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.data.text import DataError
from lorakit.lora.kernels import IGNORE_INDEX

__all__ = ["best_fit_decreasing", "collate_packed", "pack_rows"]


def best_fit_decreasing(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of record indices, each holding at most ``capacity`` tokens.

    Args:
        lengths: tokens per record (indexed by record).
        order: the records to pack, in the epoch's shuffled order; records of equal length keep this order,
            so the bins change with the shuffle while their number depends on the lengths only.
        capacity: tokens per row (``max_length``).
    """
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> bins with exactly that much room
    rooms: list[int] = []  # the keys of by_room with a bin, sorted
    for i in sorted(order, key=lambda k: -lengths[k]):  # stable: ties keep the shuffled order
        need = lengths[i]
        if need > capacity:
            raise DataError(f"record {i} has {need} tokens, more than a packed row of {capacity}")
        at = bisect.bisect_left(rooms, need)
        if at < len(rooms):
            room = rooms[at]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[at]
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


def pack_rows(rows: Sequence[Mapping[str, Any]], bins: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """One packed training row per bin: ``input_ids``, ``labels``, ``position_ids``, ``n_targets`` and
    ``records`` (the record lengths, in row order).

    Args:
        rows: encoded records with ``input_ids`` and ``labels`` (and ``n_targets``, when the trainer set it).
        bins: record indices per row (``best_fit_decreasing``).
    """
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            row = rows[i]
            ids += row["input_ids"]
            # The first token's label would be predicted from the previous record's last token.
            labels += [IGNORE_INDEX, *row["labels"][1:]]
            positions += range(len(row["input_ids"]))
        targets = sum(1 for label in labels if label != IGNORE_INDEX)
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions, "n_targets": targets,
                       "records": [len(rows[i]["input_ids"]) for i in members]})  # fmt: skip
    return packed


def collate_packed(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Packed rows as tensors: ``input_ids``, ``labels``, ``position_ids`` and a 2-D ``attention_mask``
    marking real tokens (for token counts; the model is called without it, see ``lorakit.training``).

    Args:
        batch: rows from ``pack_rows``.
        pad_token_id: the id padding tokens get.
    """
    import torch

    if not batch:
        raise DataError("collate_packed: empty batch")
    width = max(len(r["input_ids"]) for r in batch)
    out = {
        "input_ids": torch.full((len(batch), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(batch), width), dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
    }
    for k, r in enumerate(batch):
        n = len(r["input_ids"])
        out["input_ids"][k, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        out["labels"][k, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        out["position_ids"][k, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
        out["position_ids"][k, n:] = torch.arange(width - n)  # the padding: a record of its own
        out["attention_mask"][k, :n] = 1
    return out
