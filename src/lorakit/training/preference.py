"""Preference losses (DPO sigmoid / IPO / hinge, ORPO) and the reference model they compare against.

The reference is the policy's own network with the trained adapter switched off (``lorakit.disabled``),
so no second copy of the weights exists. A run started from an SFT adapter (``--init-adapter``) keeps a
frozen copy of that adapter, named ``reference``, and the reference pass switches to it instead.
Log-probabilities are summed over each answer's tokens (``labels`` != -100), as TRL's ``DPOTrainer`` does;
IPO and ORPO use the per-token mean, as TRL does for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.data.collate import IGNORE_INDEX
from lorakit.data.preference import collate_preference, encode_preference
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

__all__ = [
    "PREFERENCE_TASKS",
    "PREF_LOSSES",
    "REFERENCE_ADAPTER",
    "PreferenceLoss",
    "load_init_adapter",
    "preference_loss",
    "preference_metrics",
    "preference_step",
    "reference_mode",
    "sequence_logps",
]  # fmt: skip

PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo")
PREFERENCE_TASKS = ("dpo", "orpo")
REFERENCE_ADAPTER = "reference"
# What each step and each validation reports besides the loss (means over pairs).
PREFERENCE_METRICS = (
    "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps",
)  # fmt: skip


@dataclass(frozen=True)
class PreferenceLoss:
    """Which preference loss, and its settings.

    Attributes:
        kind: one of ``PREF_LOSSES``.
        beta: DPO's β (the KL weight); for ORPO, λ, the weight of the odds-ratio term.
        label_smoothing: cDPO's ε, the assumed share of flipped labels (sigmoid loss only).
    """

    kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PREF_LOSSES:
            raise ConfigError(f"pref_loss must be one of {list(PREF_LOSSES)}, got {self.kind!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta must be a finite positive number, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing of a preference loss must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.kind != "sigmoid":
            raise ConfigError(f"label_smoothing (cDPO) applies to the sigmoid loss only, not {self.kind!r}")

    @property
    def needs_reference(self) -> bool:
        return self.kind != "orpo"

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PreferenceLoss:
        """The loss ``cfg`` asks for: ``--pref-loss`` (default: sigmoid for ``dpo``, orpo for ``orpo``).

        Args:
            cfg: the run's settings (``task``, ``pref_loss``, ``beta``, ``label_smoothing``).
        """
        task = cfg.task.lower()
        kind = cfg.pref_loss or ("orpo" if task == "orpo" else "sigmoid")
        if task == "orpo" and kind != "orpo":
            raise ConfigError(f"task 'orpo' trains the ORPO loss; pref_loss {kind!r} needs --task dpo")
        return cls(kind, cfg.beta, cfg.label_smoothing)


# -- the reference model -----------------------------------------------------------------------------------
def load_init_adapter(model: nn.Module, path: str) -> None:
    """Start from a trained adapter: it becomes the trained adapter (``default``) and, frozen, the reference.

    Args:
        model: a freshly loaded base model (no adapter yet).
        path: the adapter directory (lorakit's or PEFT's).
    """
    from lorakit.io.files import load_adapter
    from lorakit.lora.adapters import set_adapter

    load_adapter(model, path, REFERENCE_ADAPTER, activate=False)
    load_adapter(model, path)  # "default", active: the one trained and saved
    set_adapter(model, "default")  # only its parameters train


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """Run the reference model inside the block: the frozen ``reference`` adapter if the run has one, else the
    base with adapters off; no dropout (eval mode). Everything is restored after.

    Args:
        model: the policy (possibly DDP-wrapped).
    """
    from lorakit.lora.adapters import active_adapter, configs, disabled, set_adapter
    from lorakit.training.distributed import unwrap

    inner = unwrap(model)  # the adapter registry lives on the model, not on a DDP/FSDP wrapper
    was_training = model.training
    model.eval()
    try:
        if REFERENCE_ADAPTER in configs(inner):
            previous = active_adapter(inner)
            set_adapter(inner, REFERENCE_ADAPTER)
            try:
                yield
            finally:
                set_adapter(inner, previous)
        else:
            with disabled(inner):
                yield
    finally:
        model.train(was_training)


# -- log-probabilities and losses ----------------------------------------------------------------------------
def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(summed log-probability of each row's labelled tokens, their count), position t predicting token t+1.

    Args:
        model: a causal LM.
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 where nothing is scored).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (picked - logits.logsumexp(-1)) * mask
    return logps.sum(-1), mask.sum(-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(
    loss: PreferenceLoss, policy: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor] | None,
    lengths: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(per-pair loss, chosen reward, rejected reward).

    Args:
        loss: which loss.
        policy: summed log-probs of the chosen and of the rejected answers under the trained model.
        reference: the same under the reference model (None for ORPO).
        lengths: the answers' token counts (chosen, rejected).
    """
    (pc, pr), (nc, nr) = policy, (lengths[0].clamp(min=1), lengths[1].clamp(min=1))
    if loss.kind == "orpo":
        ac, ar = pc / nc, pr / nr  # ORPO works on per-token means
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        return -ac - loss.beta * F.logsigmoid(log_odds), loss.beta * ac.detach(), loss.beta * ar.detach()
    assert reference is not None
    chosen, rejected = pc - reference[0], pr - reference[1]
    delta = chosen - rejected
    if loss.kind == "sigmoid":
        eps = loss.label_smoothing
        per_pair = -(1 - eps) * F.logsigmoid(loss.beta * delta) - eps * F.logsigmoid(-loss.beta * delta)
    elif loss.kind == "hinge":
        per_pair = torch.relu(1 - loss.beta * delta)
    else:  # ipo: squared distance of the mean-per-token log-ratio gap from 1/(2β)
        per_pair = (chosen / nc - rejected / nr - 1 / (2 * loss.beta)) ** 2
    return per_pair, loss.beta * chosen.detach(), loss.beta * rejected.detach()


def preference_step(
    loss: PreferenceLoss, model: nn.Module, batch: dict[str, Tensor]
) -> tuple[Tensor, dict[str, float]]:
    """The summed loss of a collated batch (B chosen rows, then B rejected) and the sums of the
    ``PREFERENCE_METRICS``.

    Args:
        loss: which loss.
        model: the policy; the reference runs on it under ``reference_mode``.
        batch: from ``collate_preference``.
    """
    half = batch["input_ids"].shape[0] // 2
    reference = None
    if loss.needs_reference:
        with torch.no_grad(), reference_mode(model):
            ref, _ = sequence_logps(model, batch)
        reference = (ref[:half], ref[half:])
    logps, counts = sequence_logps(model, batch)
    per_pair, r_chosen, r_rejected = preference_loss(
        loss, (logps[:half], logps[half:]), reference, (counts[:half], counts[half:])
    )
    sums = {
        "reward_accuracy": float((r_chosen > r_rejected).float().sum()),
        "reward_margin": float((r_chosen - r_rejected).sum()),
        "chosen_reward": float(r_chosen.sum()), "rejected_reward": float(r_rejected.sum()),
        "chosen_logps": float(logps[:half].detach().sum()), "rejected_logps": float(logps[half:].detach().sum()),
    }  # fmt: skip
    return per_pair.sum(), sums


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def preference_metrics(
    model: nn.Module, tokenizer: Any, items: Sequence[Any], cfg: TrainConfig, device: torch.device,
    progress: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Mean loss and ``PREFERENCE_METRICS`` over the pairs ``items`` (validation and the final score).

    Args:
        model / tokenizer: the policy and its tokenizer.
        items: ``PreferenceRecord`` pairs.
        cfg: the run's settings (loss, beta, max_length, eval_batch_size).
        device: where to run.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    loss = PreferenceLoss.from_config(cfg)
    rows = encode_preference(items, tokenizer, cfg.max_length)
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(("loss", *PREFERENCE_METRICS), 0.0)
    try:
        for chunk in tqdm(list(_chunks(rows, cfg.eval_batch_size)), desc="valid", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in collate_preference(chunk, tokenizer.pad_token_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                summed, sums = preference_step(loss, model, batch)
            totals["loss"] += float(summed)
            for key, value in sums.items():
                totals[key] += value
    finally:
        model.train(was_training)
    return {key: value / max(len(rows), 1) for key, value in totals.items()}
