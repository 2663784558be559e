"""The one rule for held-out splits, shared by every task.

A validation split comes from a valid/dev file when there is one; otherwise it is carved from train here:
deterministically (a hash of ``(seed, key)`` ranks the records, so a record's side depends only on the seed
and its own key), disjointly by key (records sharing an input never straddle two splits) and, for
classification, stratified by label. Nothing is ever carved from the file scored at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_TO_CARVE", "Carved", "carve_valid", "partition"]

# Fewer training records than this: training goes on without a validation split (and says so).
MIN_TO_CARVE = 10


def _rank(seed: int, key: Hashable) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def _counts(n: int, shares: Sequence[float]) -> list[int]:
    """Exact sizes for ``n`` keys in proportion to ``shares`` (cumulative rounding); every role gets at
    least one key when there are enough."""
    total, acc, start, out = sum(shares), 0.0, 0, []
    for k, share in enumerate(shares):
        acc += share
        end = n if k == len(shares) - 1 else round(n * acc / total)
        out.append(end - start)
        start = end
    for k, size in enumerate(out):  # take one from the largest role for an empty one
        if size == 0 and n >= len(shares):
            big = max(range(len(out)), key=lambda j: out[j])
            out[big], out[k] = out[big] - 1, 1
    return out


def partition(
    records: Sequence[Any],
    shares: dict[str, float],
    seed: int,
    key: Callable[[Any], Hashable] | None = None,
    stratify: Callable[[Any], Hashable] | None = None,
) -> dict[str, list[Any]]:
    """Split ``records`` into the roles of ``shares`` (sizes in proportion to the shares, roles taking
    consecutive runs of the hash order), file order kept within each role.

    Args:
        records: what to split.
        shares: role -> share, in the order the roles take keys.
        seed: the split seed.
        key: records with equal keys land in the same role (default: each record its own key).
        stratify: a record's class; each class is split in the same proportions.
    """
    keys = [key(r) if key is not None else i for i, r in enumerate(records)]  # default: file position
    groups: dict[Hashable, dict[Hashable, None]] = {}
    for k, r in zip(keys, records):
        groups.setdefault(stratify(r) if stratify is not None else None, {})[k] = None
    role_of: dict[Hashable, str] = {}
    for group in groups.values():
        ordered = sorted(group, key=lambda k: _rank(seed, k))
        start = 0
        for role, size in zip(shares, _counts(len(ordered), list(shares.values()))):
            role_of.update((k, role) for k in ordered[start : start + size])
            start += size
    return {role: [r for k, r in zip(keys, records) if role_of[k] == role] for role in shares}


@dataclass
class Carved:
    """The outcome of ``carve_valid``: the records to train on, the validation split and what was done."""

    train: list[Any]
    valid: list[Any]
    note: str


def carve_valid(
    records: Sequence[Any],
    fraction: float,
    seed: int,
    *,
    task: str,
    source: str,
    key: Callable[[Any], Hashable] | None = None,
    stratify: Callable[[Any], Hashable] | None = None,
) -> Carved:
    """Carve about ``fraction`` of ``records`` as the validation split, or none when ``fraction`` is 0 or
    there are too few records (fewer than ``MIN_TO_CARVE``, or fewer than two distinct keys).

    Args:
        records: the training records.
        fraction: the validation share (``--valid-split``).
        seed: the split seed (``--split-seed``).
        task: the task's name, for the note.
        source: the training file, for the note.
        key: records sharing a key stay together (e.g. one prompt with several completions).
        stratify: classification: the label, so both splits keep the class balance.
    """
    n = len(records)
    distinct = len({key(r) for r in records}) if key is not None else n
    if fraction <= 0:
        return Carved(list(records), [], f"{task}: no valid file and --valid-split 0: training without validation")
    if n < MIN_TO_CARVE or distinct < 2:
        return Carved(list(records), [], f"{task}: no valid file, and {n} training records of {source} are too "
                      f"few to carve a validation split from (at least {MIN_TO_CARVE}): training without validation")
    parts = partition(records, {"valid": fraction, "train": 1.0 - fraction}, seed, key, stratify)
    how = ", stratified by label" if stratify is not None else ""
    note = (f"{task}: no valid file; carved {len(parts['valid'])} of {n} records of {source} (split_seed "
            f"{seed}{how}) as the validation split")
    return Carved(parts["train"], parts["valid"], note)
