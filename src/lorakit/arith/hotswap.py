"""Hot-swapping adapter weights in a compiled model without recompiling (prototype).

``torch.compile`` guards on what a forward reads: parameter shapes (the rank) and Python floats (the
scaling) are baked into the graph, so loading an adapter of another rank or alpha recompiles. As PEFT's
``prepare_model_for_compiled_hotswap`` / ``hotswap_adapter`` do, :func:`prepare_for_hotswap` pads the
active adapter once, before compiling, to a maximum rank with zero rows of A and zero columns of B.
Unlike PEFT (which turns the scalings into tensors), the scaling is folded into B, so every layer keeps
the constant scaling 1.0 and nothing in the layer changes type. :func:`hotswap_adapter` then copies a
new file's s·B and A into the padded parameters in place: same shapes, same floats, same graph.
ΔW = B_pad·A_pad = s·B·A exactly, since the padding contributes zeros.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.files import AdapterFile, read_adapter
from lorakit.lora.adapters import active_adapter, configs, lora_layers
from lorakit.lora.layers import LoraLayer


def _adapted(model: nn.Module, name: str | None) -> tuple[str, list[tuple[str, LoraLayer]]]:
    name = name or active_adapter(model)
    if name is None or name not in configs(model):
        raise ConfigError(f"no adapter {name!r} to hot-swap into; loaded: {sorted(configs(model))}")
    return name, [(n, layer) for n, layer in lora_layers(model) if name in layer.adapters]


@torch.no_grad()
def prepare_for_hotswap(model: nn.Module, rank: int, name: str | None = None) -> None:
    """Pad adapter ``name`` (default: the active one) to ``rank`` and fold its scaling into B; call it
    before ``torch.compile``. The model's outputs are unchanged.

    Args:
        model: a model with the adapter loaded (e.g. by :func:`lorakit.load_adapter`).
        rank: the largest rank any adapter swapped in later will have.
        name: the adapter slot to prepare.
    """
    name, layers = _adapted(model, name)
    if not layers:
        raise ConfigError(f"adapter {name!r} adapts no layer")
    for layer_name, layer in layers:
        weights = layer.adapters[name]
        if weights.r > rank:
            raise ConfigError(f"{layer_name} has rank {weights.r}, above the hot-swap rank {rank}")
        for key in weights.spans:
            a, b = weights.A[key], weights.B[key]
            a_pad = a.new_zeros(rank, a.shape[1])
            b_pad = b.new_zeros(b.shape[0], rank)
            a_pad[: a.shape[0]], b_pad[:, : b.shape[1]] = a, b * weights.scaling
            weights.A[key] = nn.Parameter(a_pad, requires_grad=a.requires_grad)
            weights.B[key] = nn.Parameter(b_pad, requires_grad=b.requires_grad)
        weights.r, weights.scaling = rank, 1.0
        layer._stack_cache = None  # the routing stacks hold the old tensors
    # The config must describe the padded tensors, or save_adapter would write a file of the wrong rank.
    config = configs(model)[name]
    configs(model)[name] = replace(config, r=rank, alpha=float(rank), use_rslora=False, rank_pattern={},
                                   alpha_pattern={})  # fmt: skip


def _check_swappable(parsed: AdapterFile, layers: list[tuple[str, LoraLayer]], name: str, path: Path) -> None:
    prepared = {layer_name: set(layer.adapters[name].spans) for layer_name, layer in layers}
    if {m: set(s) for m, s in parsed.pairs.items()} != prepared:
        raise AdapterFileError(f"{path} adapts other modules (or slices) than adapter {name!r}; hot-swapping "
                               "keeps the compiled graph, so the targets must be the same")  # fmt: skip
    if parsed.saved_modules or parsed.biases:
        raise AdapterFileError(f"{path} carries modules_to_save or biases, which hot-swapping does not swap yet")
    for layer_name, layer in layers:
        weights = layer.adapters[name]
        if weights.scaling != 1.0:  # an unprepared slot would apply its own scaling on top of the file's
            raise ConfigError(f"adapter {name!r} is not prepared: call prepare_for_hotswap before compiling")
        for key, (a, b) in parsed.pairs[layer_name].items():
            a_pad, b_pad = weights.A[key], weights.B[key]
            if a.shape[0] > weights.r:
                raise AdapterFileError(f"{path}: {layer_name} has rank {a.shape[0]}, above the prepared {weights.r}")
            if (a.shape[1], b.shape[0]) != (a_pad.shape[1], b_pad.shape[0]):
                raise AdapterFileError(f"{path}: {layer_name} ({key}) does not fit the model's layer")


@torch.no_grad()
def hotswap_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> None:
    """Replace adapter ``name``'s weights by those of the file at ``path``, in place (no recompilation).

    Args:
        model: a model prepared by :func:`prepare_for_hotswap` (compiled or not).
        path: an adapter directory with the same targets and a rank no larger than the prepared one.
        name: the prepared adapter slot (default: the active one).

    Raises:
        AdapterFileError: the file does not fit the prepared slot; the model is then left unchanged.
    """
    path = Path(path)
    name, layers = _adapted(model, name)
    parsed = read_adapter(path)
    _check_swappable(parsed, layers, name, path)
    for layer_name, layer in layers:
        weights = layer.adapters[name]
        scaling = parsed.config.scaling_for(layer_name)
        for key, (a, b) in parsed.pairs[layer_name].items():
            r = a.shape[0]
            weights.A[key].zero_()[:r].copy_(a)
            weights.B[key].zero_()[:, :r].copy_(b * scaling)
