"""How many examples of a split are longer than ``--max-length``: one line at load time, the same for every
task and split, and the counts for the run's summary. Nothing is dropped; this only says what is cut."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["SUGGEST_ABOVE", "Truncation", "measure_truncation"]

# Above this share of cut examples the line suggests a --max-length that keeps 95 % of them whole.
SUGGEST_ABOVE = 0.05
KEEP_WHOLE = 0.95
SPLIT_WORDS = {"train": "training", "valid": "validation", "eval": "evaluation"}


@dataclass(frozen=True)
class Truncation:
    """What ``--max-length`` does to one split."""

    task: str
    split: str
    examples: int
    cut: int
    longest: int
    max_length: int
    keeps_95: int  # the smallest max length that keeps 95 % of the examples whole

    @property
    def share(self) -> float:
        return self.cut / self.examples if self.examples else 0.0

    def line(self) -> str:
        """``text: 104 of 414 training examples (25 %) are cut at --max-length 128; the longest has 684
        tokens`` (plus a suggestion above ``SUGGEST_ABOVE``)."""
        what = f"{self.task}: {self.cut} of {self.examples} {SPLIT_WORDS.get(self.split, self.split)} examples"
        if not self.cut:
            return f"{what} are cut at --max-length {self.max_length} (the longest has {self.longest} tokens)"
        text = (f"{what} ({100 * self.share:.0f} %) are cut at --max-length {self.max_length}; the longest has "
                f"{self.longest} tokens")
        if self.share > SUGGEST_ABOVE:
            text += f"; --max-length {self.keeps_95} would keep 95 % of them whole"
        return text

    def as_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "share": round(self.share, 4)}


def measure_truncation(task: str, split: str, lengths: Sequence[int], max_length: int) -> Truncation:
    """The truncation of a split whose examples are ``lengths`` tokens long before any cut.

    Args:
        task: the task's name (for the line).
        split: "train", "valid" or "eval".
        lengths: each example's full length in tokens.
        max_length: the cut-off.
    """
    ordered = sorted(lengths)
    keeps = ordered[max(0, math.ceil(KEEP_WHOLE * len(ordered)) - 1)] if ordered else 0
    return Truncation(task, split, len(ordered), sum(1 for n in ordered if n > max_length),
                      ordered[-1] if ordered else 0, max_length, keeps)
