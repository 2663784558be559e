"""The optimizer and its schedule: AdamW parameter groups (weight decay, task heads, LoRA+) and the lr curve."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.lora.adapters import lora_layers, saved_module_parameters
from lorakit.training.checkpoint import trainable_parameters
from lorakit.training.config import TrainConfig


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    Args:
        step: the optimizer step about to be taken.
        total: steps in the run.
        warmup: warm-up steps.
        schedule: ``constant``, ``linear`` or ``cosine`` (after warm-up).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never a wasted step at lr = 0
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lora_b_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every LoRA B matrix (the up-projection, initialised to zero) of every adapter in ``model``."""
    return [p for _, layer in lora_layers(model) for w in layer.adapters.values() for p in w.B.values()]


def _group_lr(cfg: TrainConfig, head: bool, lora_b: bool) -> float:
    assert cfg.lr is not None and cfg.head_lr_ratio is not None  # checked by build_optimizer
    if head:
        return cfg.lr * cfg.head_lr_ratio
    # LoRA+ (Hayou et al., 2024; PEFT's loraplus_lr_ratio): B learns at ratio x the lr of A.
    return cfg.lr * (cfg.loraplus_ratio if lora_b else 1.0)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, in groups.

    No weight decay on biases and norm weights; task heads trained with an adapter (``modules_to_save``)
    at ``head_lr_ratio`` times the lr; with ``loraplus_ratio``, LoRA's B matrices at that many times the lr.

    Args:
        model: the prepared (possibly wrapped) model.
        cfg: the run's settings, with ``lr`` and ``head_lr_ratio`` resolved.
    """
    if cfg.lr is None or cfg.head_lr_ratio is None:
        raise ConfigError("no learning rate: call resolve_task_defaults(cfg, kind) first (or set lr)")
    heads = {id(p) for p in saved_module_parameters(model)}
    # Without LoRA+ the B matrices stay in their groups: the same groups as before it existed, so older
    # checkpoints still resume.
    b_ids = {id(p) for p in lora_b_parameters(model)} if cfg.loraplus_ratio is not None else set()
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for _, p in trainable_parameters(model):
        groups.setdefault((p.ndim >= 2, id(p) in heads, id(p) in b_ids), []).append(p)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": _group_lr(cfg, head, b)}
        for (decay, head, b), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's lr times ``lr_factor`` of the step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, schedule))
