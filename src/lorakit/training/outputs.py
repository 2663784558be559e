"""The files a run writes into its output folder, and saving / loading what it trained.

A LoRA run saves a PEFT-layout adapter; any other method saves ``method_config.json`` +
``method_model.safetensors`` (``lorakit.methods.io``, the same files ``save_method`` writes). Run folders from
before that change hold ``trainable_state.safetensors`` + ``trainable_state.json``: still loaded here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.chat_templates import CHAT_TEMPLATE_FILE, read_chat_template, save_chat_template
from lorakit.errors import AdapterFileError
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, check_finite, read_pair, read_weights
from lorakit.methods import get_method
from lorakit.methods import io as method_io
from lorakit.training.config import TrainConfig

TRAIN_CONFIG = "train_config.json"
METRICS_LOG = "metrics.jsonl"
EVAL_RESULTS = "eval_results.json"
PLOT = "training.png"
PREDICTIONS = "eval_predictions.jsonl"
RUN_SUMMARY = "run_summary.json"  # split sizes, how they were made, truncation, what the final score measured
TENSORBOARD_DIR = "tensorboard"
# Read only: the trainer's own format for non-LoRA state, before it wrote method_io's.
LEGACY_WEIGHTS = "trainable_state.safetensors"
LEGACY_CONFIG = "trainable_state.json"
LEGACY_FORMAT = "lorakit-trainable-state"
# One folder holds one trained state: (config, weights) of each kind, config first.
TRAINED_KINDS = (
    (CONFIG_NAME, WEIGHTS_NAME),
    (method_io.CONFIG_NAME, method_io.WEIGHTS_NAME),
    (LEGACY_CONFIG, LEGACY_WEIGHTS),
)
# The trained state: kept by --overwrite until the new run's final save replaces it.
TRAINED_FILES = tuple(name for kind in TRAINED_KINDS for name in kind)
# Files a run writes into its output directory (removed by --overwrite, nothing else is touched).
RUN_FILES = (TRAIN_CONFIG, METRICS_LOG, EVAL_RESULTS, PLOT, PREDICTIONS, RUN_SUMMARY, CHAT_TEMPLATE_FILE,
             *TRAINED_FILES)


def save_trained(model: nn.Module, path: str | Path, cfg: TrainConfig) -> Path:
    """Write what training produced into directory ``path``, in the format of ``cfg.method``.

    Other files in ``path`` are kept, so a run's final files go straight into its output folder; trained
    files of another kind (an overwritten run's) are removed.

    Args:
        model: the (unwrapped) model the method was applied to.
        path: the directory.
        cfg: the run's settings (``cfg.method`` picks the format).
    """
    method = get_method(cfg.method)
    saved = method.save(model, path)
    if cfg.chat_template:  # generate and serve render prompts with the template the run trained with
        save_chat_template(path, read_chat_template(cfg.chat_template))
    for kind in TRAINED_KINDS:
        if kind != method.files:
            for name in kind:
                (Path(path) / name).unlink(missing_ok=True)
    return saved


def read_legacy_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an old ``trainable_state.*`` pair, checked before any model is touched."""
    meta, weights = read_pair(path, LEGACY_CONFIG, LEGACY_WEIGHTS, "trained state")
    if meta.get("format") != LEGACY_FORMAT or "train_config" not in meta:
        raise AdapterFileError(f"{Path(path) / LEGACY_CONFIG} is not a lorakit trained state")
    if not meta.get("sha256"):  # always written: its absence means the pair was not saved whole
        raise AdapterFileError(f"{Path(path) / LEGACY_CONFIG} records no checksum of its weights")
    tensors = read_weights(weights, meta["sha256"], LEGACY_CONFIG)
    check_finite(tensors, weights)
    return meta, tensors


def _load_legacy(model: nn.Module, path: Path) -> None:
    meta, tensors = read_legacy_state(path)
    # Rebuild the method's structure (it may add modules), then fill in the trained values.
    cfg = TrainConfig.from_dict(meta["train_config"])
    get_method(cfg.method).prepare_for_training(model, cfg)
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise AdapterFileError(f"{path}: trained tensor {name!r} does not exist in this model")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{path}: {name} is {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def load_trained(model: nn.Module, path: str | Path) -> None:
    """Load what a run trained (an adapter, a method's state, or an old trainable state) into a fresh base.

    Args:
        model: a freshly loaded base model of the run's kind.
        path: a run folder, a checkpoint folder or an adapter folder.
    """
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        get_method("lora").load(model, path)
        return
    if (path / method_io.CONFIG_NAME).is_file():
        config, _ = method_io.read_method(path)
        get_method(config["method"]).load(model, path)
    elif (path / LEGACY_CONFIG).is_file():
        _load_legacy(model, path)
    else:
        raise AdapterFileError(
            f"{path} holds neither a LoRA adapter ({CONFIG_NAME}) nor a trained state "
            f"({method_io.CONFIG_NAME} or {LEGACY_CONFIG})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
