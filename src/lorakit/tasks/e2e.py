"""``e2e``: a causal LM continues ``"<MR> ||"`` with the reference; BLEU, NIST, METEOR, ROUGE-L, CIDEr."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorakit.data import DataError, E2EItem, e2e_splits
from lorakit.errors import ConfigError
from lorakit.tasks.spec import TaskData, TaskSpec, subsample

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig


def load_e2e_task(cfg: TrainConfig, roles: Sequence[str]) -> TaskData:
    """E2E's MR/reference examples: one training example per (MR, reference) pair."""
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
    out = TaskData(TaskSpec("e2e", "generation", "causal-lm", metric="e2e"))
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
