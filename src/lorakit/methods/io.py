"""Save and load a method's trained state: ``method_config.json`` + ``method_model.safetensors``.

This is the one file format for trained state that is not a LoRA adapter: ``apply_method`` users and
``lorakit train`` both write it (the trainer's older ``trainable_state.*`` pair is still read, by
``lorakit.training.outputs.load_trained``).

The JSON names the method and its options (enough to rebuild the structure on a fresh base model), the
base model's fingerprint, every tensor's shape and the checksum of the weights file. Saves are atomic per
file (``lorakit.io.files.write_weights_and_config``); loads check everything they can before touching the model.
No pickle anywhere. LoRA has its own PEFT-compatible files: use ``lorakit.save_adapter``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.files import _fingerprint, check_finite, read_pair, read_weights, write_weights_and_config
from lorakit.methods.registry import METHODS, MethodResult, apply_method, method_of
from lorakit.version import __version__

CONFIG_NAME = "method_config.json"
WEIGHTS_NAME = "method_model.safetensors"
FORMAT = "lorakit-method"


def save_method(model: nn.Module, path: str | Path) -> Path:
    """Write the applied method's trainable parameters (by name) and its config to directory ``path``.

    Args:
        model: a model prepared by ``apply_method`` (or by the trainer, which uses it).
        path: the directory (created; other files in it are kept).
    """
    record = method_of(model)
    if record is None:
        raise ConfigError("no method applied to this model (apply_method first)")
    if record["name"] == "lora":
        raise ConfigError("LoRA adapters are saved in PEFT's layout: use lorakit.save_adapter(model, path)")
    params = dict(model.named_parameters())
    missing = [n for n in record["trainable"] if n not in params]
    if missing:
        raise ConfigError(f"the model no longer has parameter(s) {missing[:3]} of method {record['name']!r}")
    # The file must not alias model memory (safetensors refuses shared storage) and must be contiguous.
    tensors = {n: params[n].detach().to("cpu").contiguous().clone() for n in record["trainable"]}

    def config_with(sha256: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": __version__,
            "method": record["name"],
            "options": record["options"],
            "base_model": _fingerprint(model),
            "tensors": {n: list(t.shape) for n, t in tensors.items()},
            "sha256": sha256,
        }

    return write_weights_and_config(path, tensors, WEIGHTS_NAME, config_with, CONFIG_NAME)


def read_method(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a method directory, checked for completeness and integrity."""
    path = Path(path)
    config, weights_path = read_pair(path, CONFIG_NAME, WEIGHTS_NAME, "method")
    config_path = path / CONFIG_NAME
    if config.get("format") != FORMAT:
        raise AdapterFileError(f"{config_path}: not a lorakit method file (format={config.get('format')!r})")
    for key in ("method", "options", "tensors"):
        if key not in config:
            raise AdapterFileError(f"{config_path}: missing field {key!r}")
    if config["method"] not in METHODS:
        raise AdapterFileError(
            f"{config_path}: unknown method {config['method']!r}; known: {', '.join(METHODS)}"
        )
    tensors = read_weights(weights_path, config.get("sha256"), CONFIG_NAME)
    listed = {n: tuple(s) for n, s in config["tensors"].items()}
    stored = {n: tuple(t.shape) for n, t in tensors.items()}
    if listed != stored:
        raise AdapterFileError(f"{path}: the weights file and {CONFIG_NAME} list different tensors")
    check_finite(tensors, weights_path)
    return config, tensors


def _check_base(model: nn.Module, path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The file's base fingerprint and the shapes of base parameters it holds, against ``model``."""
    mine = _fingerprint(model)
    theirs = config.get("base_model") or {}
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if theirs.get(key) is not None and mine.get(key) is not None and theirs[key] != mine[key]:
            raise AdapterFileError(
                f"{path} was trained on a base with {key}={theirs[key]!r}, this model has {mine[key]!r}"
            )
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():  # base parameters (full, fttop2, bitfit) can be checked already
        if name in params and tuple(params[name].shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{path}: {name} is {tuple(tensor.shape)} in the file, {tuple(params[name].shape)} here"
            )


def _fill(model: nn.Module, path: Path, method: str, trainable: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the file's values into the rebuilt method's parameters, which must be exactly the file's."""
    reload = "(the model now carries the method untrained; reload it before retrying)"
    expected = set(trainable)
    if expected != set(tensors):
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterFileError(
            f"{path} does not fit this model's {method!r}: missing {missing[:3]}, unexpected {extra[:3]} {reload}"
        )
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{path}: {name} is {tuple(tensor.shape)} in the file, {tuple(params[name].shape)} here {reload}"
            )
        params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))


@torch.no_grad()
def load_method(model: nn.Module, path: str | Path) -> MethodResult:
    """Rebuild the saved method on a fresh base ``model`` and load its trained values.

    The file is fully checked, and its fingerprint compared with the model, before the model is touched;
    should the rebuilt method still not match the file (a different base of the same shape), the error
    says so and the model must be reloaded.

    Args:
        model: a freshly loaded base model.
        path: a directory written by ``save_method`` (or by ``lorakit train`` for a non-LoRA method).
    """
    path = Path(path)
    config, tensors = read_method(path)
    _check_base(model, path, config, tensors)
    options = dict(config["options"])
    build = dict(options)
    if "init" in build:
        build["init"] = "normal"  # values are overwritten next: skip the data-dependent initialisation
    result = apply_method(model, config["method"], **build)
    model.lorakit_method["options"] = options
    result.options = options
    _fill(model, path, config["method"], result.trainable_names, tensors)
    return result
