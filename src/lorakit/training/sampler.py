"""The batches of one epoch (random, ``epoch_order``, or grouped by length, ``length_grouping``) and each
process's share of them (``local_micro_batches``).

Grouping sorts examples by length inside windows of ``group_window`` batches of the shuffled order, cuts
the result into global batches and shuffles the batches, so a batch holds examples of similar length (less
padding) while the epoch stays random. Everything is a function of ``(seed, epoch, lengths)``: the position
in the epoch is still all a checkpoint needs to continue the same sequence, and every example is seen once
per epoch with the same number of batches as random batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lorakit.data.packing import best_fit_decreasing, pack_rows
from lorakit.training.config import TrainConfig


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batches(order: list[int], batch_size: int, world_size: int) -> list[list[int]]:
    """Consecutive global batches; a last batch smaller than the number of processes is dropped."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < world_size:
        batches.pop()
    return batches


def local_micro_batches(batch: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This process's share of a global batch as micro-batches (all non-empty, same count on every rank)."""
    share = [int(i) for i in np.array_split(np.asarray(batch), world_size)[rank]]
    n_micro = max(1, min(grad_accum, len(batch) // world_size))
    return [[int(i) for i in part] for part in np.array_split(np.asarray(share), n_micro)]


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                         window_batches: int) -> list[int]:  # fmt: skip
    """An epoch's example order in which consecutive ``batch_size`` slices have similar lengths.

    Args:
        lengths: tokens per example.
        batch_size: the global batch.
        seed / epoch: the order is a function of these (and ``lengths``) only.
        window_batches: batches per sorting window (``TrainConfig.group_window``).
    """
    order = epoch_order(len(lengths), seed, epoch)
    window = batch_size * window_batches
    grouped: list[int] = []
    for start in range(0, len(order), window):
        # Longest first within a window; ties keep the shuffled order (sorted is stable).
        grouped += sorted(order[start : start + window], key=lambda i: -lengths[i])
    return grouped


def epoch_batches(rows: Sequence[dict[str, Any]], cfg: TrainConfig, epoch: int, world_size: int) -> list[list[int]]:
    """The global batches of ``epoch`` (indices into ``rows``), random or length-grouped per ``cfg``.

    Args:
        rows: encoded training rows (``input_ids`` gives each length).
        cfg: the run's config (``seed``, ``batch_size``, ``length_grouping``, ``group_window``).
        epoch: 0-based epoch.
        world_size: processes sharing each batch (a last batch smaller than this is dropped).
    """
    if not cfg.length_grouping:
        return global_batches(epoch_order(len(rows), cfg.seed, epoch), cfg.batch_size, world_size)
    lengths = [len(r["input_ids"]) for r in rows]
    order = length_grouped_order(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_window)
    batches = global_batches(order, cfg.batch_size, world_size)
    # Shuffle whole batches, so the epoch does not run from long to short within each window.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 7_919)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def padded_share(rows: Sequence[dict[str, Any]], batches: Sequence[Sequence[int]]) -> float:
    """Share of positions in the padded batches that are padding (micro-batches pad on their own, so this
    is a lower bound for grad_accum > 1)."""
    useful = sum(len(rows[i]["input_ids"]) for b in batches for i in b)
    total = sum(len(b) * max(len(rows[i]["input_ids"]) for i in b) for b in batches if b)
    return 1.0 - useful / total if total else 0.0


def _packed_bins(rows: Sequence[dict[str, Any]], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The epoch's packed rows as record indices: best-fit decreasing over the shuffled order, then the rows
    shuffled (so the epoch does not run from long records to short ones)."""
    lengths = [len(r["input_ids"]) for r in rows]
    bins = best_fit_decreasing(lengths, epoch_order(len(rows), cfg.seed, epoch), cfg.max_length)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 104_729)
    return [bins[i] for i in torch.randperm(len(bins), generator=generator).tolist()]


def epoch_plan(rows: Sequence[dict[str, Any]], cfg: TrainConfig, epoch: int,
               world_size: int) -> tuple[Sequence[dict[str, Any]], list[list[int]]]:  # fmt: skip
    """The rows the batches of ``epoch`` index and those batches: ``rows`` itself with random or
    length-grouped batches, or (``cfg.packing``) the epoch's packed rows in batches of ``batch_size`` rows.
    A function of (seed, epoch, rows), so the position in the epoch is still all a checkpoint needs.

    Args:
        rows: encoded training rows.
        cfg: the run's config.
        epoch: 0-based epoch.
        world_size: processes sharing each batch.
    """
    if not cfg.packing:
        return rows, epoch_batches(rows, cfg, epoch, world_size)
    packed = pack_rows(rows, _packed_bins(rows, cfg, epoch))
    return packed, global_batches(list(range(len(packed))), cfg.batch_size, world_size)


def steps_per_epoch(rows: Sequence[dict[str, Any]], cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps in one epoch (with packing, the number of packed rows depends on the lengths only).

    Args:
        rows: encoded training rows.
        cfg: the run's config.
        world_size: processes sharing each batch.
    """
    n = len(_packed_bins(rows, cfg, 0)) if cfg.packing else len(rows)
    return len(global_batches(list(range(n)), cfg.batch_size, world_size))
