"""Every training method (LoRA and the paper's baselines) behind one registry.

``apply_method(model, name, **options)`` freezes the model, injects the method's parameters (no model code
is edited: hooks and child modules only) and returns the trainable parameters. Every method except
``full`` also trains the task head of a classification model (``train_head=False`` turns that off).
The trainer (``lorakit train --method NAME``) and the loaders (``load_method``, ``lorakit eval``) use the same
registry, so ``register_method`` makes a new method reachable from all of them.

>>> result = apply_method(model, "adapter_h", bottleneck=32)
>>> result.trainable, result.total
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lorakit.io.files import CONFIG_NAME as ADAPTER_CONFIG
from lorakit.io.files import WEIGHTS_NAME as ADAPTER_WEIGHTS
from lorakit.methods.bitfit import apply_bitfit
from lorakit.methods.bottleneck import apply_adapter
from lorakit.methods.finetune import apply_fttop, apply_full, apply_head
from lorakit.methods.io import CONFIG_NAME as METHOD_CONFIG
from lorakit.methods.io import WEIGHTS_NAME as METHOD_WEIGHTS
from lorakit.methods.io import load_method, save_method
from lorakit.methods.lora import apply_lora, load_lora, lora_options, save_lora
from lorakit.methods.prefix import apply_prefix_embed, apply_prefix_layer
from lorakit.methods.registry import (
    METHODS,
    Loader,
    Method,
    MethodResult,
    Saver,
    add_method,
    apply_method,
    get_method,
    known_methods,
    method_of,
    options_from_method_options,
    parse_options,
    resolve_options,
    trainable_summary,
)

__all__ = [
    "METHODS",
    "Method",
    "MethodResult",
    "apply_method",
    "get_method",
    "known_methods",
    "load_method",
    "method_of",
    "parse_options",
    "register_method",
    "resolve_options",
    "save_method",
    "trainable_summary",
]


def register_method(
    name: str,
    apply: Callable[..., None],
    summary: str = "",
    *,
    changes_forward: bool = False,
    save: Saver = save_method,
    load: Loader = load_method,
    files: tuple[str, ...] = (METHOD_CONFIG, METHOD_WEIGHTS),
    options_from_config: Callable[[Any], dict[str, Any]] = options_from_method_options,
) -> Method:
    """Make method ``name`` reachable from ``apply_method``, ``lorakit train --method`` and the loaders.

    Args:
        name: the method's name.
        apply: ``(model, **options)``; must leave exactly the parameters to train with
            ``requires_grad=True`` (adding modules if the method needs them). Its keyword defaults are the
            method's options.
        summary: one line for listings.
        changes_forward: whether it adds computation (adapters, prefixes).
        save / load / files: its file format and the files it writes; default: ``method_config.json`` +
            ``method_model.safetensors``.
        options_from_config: a training config → options; default: its ``method_options``.
    """
    return add_method(Method(name, summary, apply, changes_forward, save, load, files, options_from_config))


def _bottleneck(variant: str) -> Callable[..., None]:
    def apply(model: nn.Module, bottleneck: int = 16, activation: str = "relu", train_head: bool = True) -> None:
        apply_adapter(model, variant, bottleneck, activation, train_head)

    return apply


def _head_options(cfg: Any) -> dict[str, Any]:
    options = options_from_method_options(cfg)
    if getattr(cfg, "modules_to_save", None):
        options.setdefault("heads", ",".join(cfg.modules_to_save))
    return options


for _args in (
    ("full", apply_full, "full fine-tuning: every parameter"),
    ("fttop2", apply_fttop, "only the last `layers` (2) blocks, plus the task head"),
    ("bitfit", apply_bitfit, "only the bias vectors, plus the task head"),
    ("adapter_h", _bottleneck("adapter_h"), "Houlsby adapters after attention and after the MLP", True),
    ("adapter_l", _bottleneck("adapter_l"), "Lin adapter (with its own LayerNorm) after the MLP", True),
    ("adapter_p", _bottleneck("adapter_p"), "Pfeiffer adapter after the MLP", True),
    ("prefix_embed", apply_prefix_embed, "trainable virtual tokens: lp before the input, li after the prompt",
     True),
    ("prefix_layer", apply_prefix_layer, "trainable key/value prefixes of `length` in every attention layer",
     True),
):
    register_method(*_args[:3], changes_forward=bool(_args[3:]))
register_method("head", apply_head, "only the classifier head (frozen features)", options_from_config=_head_options)
register_method(
    "lora", apply_lora, "LoRA (lorakit.inject) on `targets` with rank r",
    save=save_lora, load=load_lora, files=(ADAPTER_CONFIG, ADAPTER_WEIGHTS), options_from_config=lora_options,
)
