"""Scoring a model, or a base model plus what a run trained, on a task's eval split (``lorakit eval``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from lorakit.data.chat_templates import apply_chat_template, read_chat_template, saved_chat_template
from lorakit.tasks import load_task
from lorakit.training.config import TrainConfig
from lorakit.training.defaults import DEFAULT_MAX_LENGTH
from lorakit.training.evaluate import score
from lorakit.training.outputs import load_trained
from lorakit.training.prepare import seed_everything


def evaluate_model(cfg: TrainConfig, adapter: str | None) -> tuple[dict[str, float], list[Any]]:
    """Load the eval split, the model (+ what a run trained) and score it; returns (metrics, predictions).

    Args:
        cfg: the evaluation settings (task, data, model, decoding ...).
        adapter: a LoRA adapter or a run / checkpoint folder of ``lorakit train``; None: the model alone.
    """
    import torch

    from lorakit.io.models import load_model
    from lorakit.training.distributed import pick_device

    data = load_task(cfg, roles=("eval",))  # data errors before the model is loaded
    spec = data.spec
    if cfg.max_length is None:  # the task's own default, as training resolves it
        cfg = dataclasses.replace(cfg, max_length=spec.recipe.get("max_length", DEFAULT_MAX_LENGTH))
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, spec.model_task, num_labels=spec.num_labels)
    template = read_chat_template(cfg.chat_template) if cfg.chat_template else None
    apply_chat_template(tokenizer, template or (saved_chat_template([adapter]) if adapter else None))
    if adapter is not None:
        load_trained(model, adapter)
    if spec.kind == "preference" and cfg.init_adapter:  # the run's reference: its starting adapter, frozen
        from lorakit.io.files import load_adapter
        from lorakit.training.preference import REFERENCE_ADAPTER

        load_adapter(model, cfg.init_adapter, REFERENCE_ADAPTER, activate=False)
    model.to(device).eval()
    predictions: list[Any] = []
    with torch.no_grad():
        metrics = score(
            model, tokenizer, spec, data.eval, cfg, device, progress=True, predictions_out=predictions
        )
    return metrics, predictions
