"""Adapter files: PEFT's directory layout (adapter_config.json + adapter_model.safetensors).

lorakit writes exactly what PEFT writes, plus a ``lorakit`` section PEFT ignores (base-model fingerprint,
the user's targets, fused slices, a checksum). Saves are atomic; loads validate everything against the
model before touching it. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.errors import AdapterFileError
from lorakit.io.adapter_read import read_adapter
from lorakit.io.layout import (
    CONFIG_NAME,
    PEFT_UNSUPPORTED_TARGET,
    PREFIX,
    WEIGHTS_NAME,
    AdapterFile,
    tensor_key,
)
from lorakit.io.pairs import (
    _sha256,
    check_finite,
    read_pair,
    read_weights,
    settle_pair,
    write_weights_and_config,
)
from lorakit.lora.adapters import DEFAULT, active_adapter, configs, inject, lora_layers, set_adapter
from lorakit.lora.arch import QKV_SLICES, family_of, fused_slices, slice_span
from lorakit.lora.config import LoraConfig
from lorakit.lora.kinds import adapter_param_names
from lorakit.lora.layers import WHOLE, LoraLayer, ModuleCopies
from lorakit.lora.variants import RESIDUAL_INITS
from lorakit.lora.weights import LoraWeights
from lorakit.version import __version__

__all__ = [
    "CONFIG_NAME",
    "PEFT_UNSUPPORTED_TARGET",
    "PREFIX",
    "WEIGHTS_NAME",
    "AdapterFile",
    "_sha256",
    "check_finite",
    "converted_config",
    "load_adapter",
    "read_adapter",
    "read_pair",
    "read_weights",
    "save_adapter",
    "settle_pair",
    "tensor_key",
    "write_weights_and_config",
]


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
        "architectures": getattr(cfg, "architectures", None),
    }


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def _collect(model: nn.Module, name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adapter ``name``'s tensors in PEFT's keys (copied to CPU) and its ``adapter_config.json``."""
    config = configs(model)[name]
    tensors: dict[str, Tensor] = {}
    targets: list[str] = []
    slices_of: dict[str, list[str]] = {}
    shapes: dict[str, list[int]] = {}
    for layer_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        weights = layer.adapters[name]
        targets.append(layer_name)
        shapes[layer_name] = [layer.out_features, layer.in_features]
        tensors.update(_layer_tensors(layer_name, layer, weights))
        if weights.slices is not None:
            slices_of[layer_name] = list(weights.slices)
        if config.bias == "lora_only" and layer.bias is not None:
            tensors[f"{PREFIX}{layer_name}.base_layer.bias"] = layer.bias
    if config.bias == "all":
        adapter_state = adapter_param_names(model)
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias") and param_name not in adapter_state:
                tensors[PREFIX + param_name.replace(".original_module", "")] = p
    saved_names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ModuleCopies) and name in module.copies:
            saved_names.append(module_name)
            for key, value in module.copies[name].state_dict().items():
                tensors[f"{PREFIX}{module_name}.{key}"] = value
    # The file must not alias model memory (safetensors refuses shared storage) and must be contiguous.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    raw = _config_json(model, converted_config(config), targets, slices_of, shapes, saved_names)
    if config.init in RESIDUAL_INITS:
        raw["lorakit"]["converted_from"] = config.init
    return tensors, raw


def _layer_tensors(layer_name: str, layer: LoraLayer, weights: LoraWeights) -> dict[str, Tensor]:
    """One layer's A and B per span (and DoRA's magnitude), keyed as PEFT names them."""
    tensors: dict[str, Tensor] = {}
    for key in weights.spans:
        a, b = weights.A[key], weights.B[key]
        if weights.residual is not None:
            # PiSSA/OLoRA → plain LoRA on the original base (PEFT's conversion):
            # s·B·A − s·B0·A0 = s·[B | −B0]·[A ; A0], rank 2r.
            a0, b0 = weights.residual[key]
            a, b = torch.cat([a, a0.to(a.dtype)], 0), torch.cat([b, -b0.to(b.dtype)], 1)
        tensors[tensor_key(layer_name, layer.kind, key, "A")] = a
        tensors[tensor_key(layer_name, layer.kind, key, "B")] = b
    if weights.magnitude is not None:
        tensors[f"{PREFIX}{layer_name}.lora_magnitude_vector"] = weights.magnitude
    return tensors


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config a PiSSA/OLoRA adapter's file carries: a plain LoRA of rank 2r with the same scaling
    (PEFT's ``path_initial_model_for_weight_conversion``); other configs unchanged.

    Args:
        config: the adapter's config.
    """
    if config.init not in RESIDUAL_INITS:
        return config
    alpha_factor = 2**0.5 if config.use_rslora else 2.0  # keeps alpha/sqrt(r) resp. alpha/r
    return dataclasses.replace(
        config,
        r=2 * config.r,
        alpha=config.alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        init="kaiming",  # PEFT's init_lora_weights=True
    )


def _config_json(
    model: nn.Module,
    config: LoraConfig,
    targets: list[str],
    slices_of: dict[str, list[str]],
    shapes: dict[str, list[int]],
    saved_names: list[str],
) -> dict[str, Any]:
    """adapter_config.json: PEFT's keys, plus the ``lorakit`` section PEFT ignores."""
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": [PEFT_UNSUPPORTED_TARGET] if slices_of else sorted(targets),
        "bias": config.bias,
        "modules_to_save": saved_names or None,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lorakit": {
            "version": __version__,
            "config": config.to_dict(),
            "modules": sorted(targets),
            "fused_slices": slices_of,
            "shapes": shapes,
            "base_model": _fingerprint(model),
        },
    }


def save_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to directory ``path``, atomically.

    Each file is written under a temporary name in ``path`` and renamed over the old one, so an interrupted
    save never leaves a half-written file; the config records the weights' checksum, so a crash between the
    two renames is reported on load instead of pairing a config with the wrong weights. Other files in
    ``path`` (a training run's logs, say) are left alone. A PiSSA/OLoRA adapter is written as PEFT converts
    it: a plain LoRA of rank 2r for the original base.

    Args:
        model: a model with adapters.
        path: the directory to write.
        name: the adapter (default: the active one).

    Raises:
        KeyError: when no adapter of that name is loaded.
        AdapterFileError: when a tensor is not finite.
    """
    name = name or active_adapter(model) or DEFAULT
    if name not in configs(model):
        raise KeyError(f"no adapter named {name!r}; loaded: {sorted(configs(model))}")
    tensors, raw = _collect(model, name)

    def config_with(sha256: str) -> dict[str, Any]:
        raw["lorakit"]["sha256"] = sha256
        return raw

    return write_weights_and_config(path, tensors, WEIGHTS_NAME, config_with, CONFIG_NAME)


def _slot_width(layer: LoraLayer, fused: tuple[str, ...], slot: str, path: Path) -> int:
    """Output rows of B for one (A, B) pair: the whole layer, or one slice of a fused projection."""
    if slot == WHOLE:
        return layer.out_features
    try:
        start, stop = slice_span(layer.out_features, fused, slot)
    except ValueError as exc:
        raise AdapterFileError(f"{path}: {exc}") from None
    return stop - start



def _check_fits(model: nn.Module, parsed: AdapterFile, path: Path) -> dict[str, tuple[str, ...] | None]:
    """Every tensor must fit the model; returns the {module: slices} map to inject."""
    fingerprint = (parsed.raw_config.get("lorakit") or {}).get("base_model") or {}
    mine = _fingerprint(model)
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if fingerprint.get(key) is not None and mine.get(key) is not None and fingerprint[key] != mine[key]:
            raise AdapterFileError(
                f"{path} was trained on a base with {key}={fingerprint[key]!r}, this model has {mine[key]!r}"
            )
    modules: dict[str, tuple[str, ...] | None] = {}
    names = dict(model.named_modules())
    for module, slots in parsed.pairs.items():
        target = names.get(module)
        if target is None:
            raise AdapterFileError(f"{path}: adapted module {module!r} does not exist in this model")
        layer = target if isinstance(target, LoraLayer) else LoraLayer(target)
        rank = parsed.config.rank_for(module)
        fused = fused_slices(family_of(model), module) or QKV_SLICES
        for slot, (a, b) in slots.items():
            expected_a, expected_b = (rank, layer.in_features), (_slot_width(layer, fused, slot, path), rank)
            if module in parsed.magnitudes and tuple(parsed.magnitudes[module].shape) != (layer.out_features,):
                raise AdapterFileError(f"{path}: {module}: lora_magnitude_vector has shape "
                                       f"{tuple(parsed.magnitudes[module].shape)}, this model needs "
                                       f"({layer.out_features},)")
            if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                raise AdapterFileError(
                    f"{path}: {module} ({slot}): file has A {tuple(a.shape)}, B {tuple(b.shape)}; this model "
                    f"with r={rank} needs A {expected_a}, B {expected_b}"
                )
        modules[module] = None if WHOLE in slots else tuple(s for s in fused if s in slots)
    _check_saved_and_biases(names, parsed, path)
    return modules


def _check_saved_and_biases(names: dict[str, nn.Module], parsed: AdapterFile, path: Path) -> None:
    """Saved modules' tensors and biases must fit the modules they go into."""
    for module, state in parsed.saved_modules.items():
        target = names.get(module)
        if target is None:
            raise AdapterFileError(f"{path}: saved module {module!r} does not exist in this model")
        own = (target.original_module if isinstance(target, ModuleCopies) else target).state_dict()
        for key, value in state.items():
            if key not in own or tuple(own[key].shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"{path}: saved tensor {module}.{key} {tuple(value.shape)} does not fit the model's "
                    f"{tuple(own[key].shape) if key in own else 'missing parameter'}"
                )
    for module, bias in parsed.biases.items():
        target = names.get(module)
        base = getattr(target, "base_layer", target)
        if getattr(base, "bias", None) is None or tuple(base.bias.shape) != tuple(bias.shape):
            raise AdapterFileError(f"{path}: bias for {module} does not fit the model")


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path, name: str = DEFAULT, *, activate: bool = True) -> nn.Module:
    """Load an adapter directory (lorakit's or PEFT's) into ``model`` as adapter ``name``.

    Everything is validated first; on any error the model is left exactly as it was.

    Args:
        model: the base model.
        path: the adapter directory.
        name: the name to load it under.
        activate: make it the active adapter.

    Raises:
        AdapterFileError: naming what in the file is wrong or does not fit the model.
    """
    path = Path(path)
    parsed = read_adapter(path)
    if name in configs(model):
        raise AdapterFileError(f"adapter {name!r} is already loaded; pick another name or delete it")
    modules = _check_fits(model, parsed, path)
    previous = active_adapter(model)
    config = parsed.config
    saved = tuple(parsed.saved_modules)
    config = LoraConfig(**{**config.to_dict(), "modules_to_save": saved})
    inject(model, config, name, activate=False, modules=modules)
    for layer_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        weights = layer.adapters[name]
        for slot, (a, b) in parsed.pairs[layer_name].items():
            weights.A[slot].copy_(a)
            weights.B[slot].copy_(b)
        if weights.magnitude is not None:
            weights.magnitude.copy_(parsed.magnitudes[layer_name])
    names = dict(model.named_modules())
    for module, state in parsed.saved_modules.items():
        wrapper = names[module]
        assert isinstance(wrapper, ModuleCopies)
        wrapper.copies[name].load_state_dict(state, strict=False)
    for module, bias in parsed.biases.items():
        layer = names[module]
        getattr(layer, "base_layer", layer).bias.copy_(bias)
    set_adapter(model, name if activate else previous)
    return model
