"""The paper's baselines as first-class methods, behind one registry.

``apply_method(model, name, **options)`` freezes the model, injects the method's parameters (no model code
is edited: hooks and child modules only) and returns the trainable parameters. Every method except
``full`` also trains the task head of a classification model (``train_head=False`` turns that off).

>>> result = apply_method(model, "adapter_h", bottleneck=32)
>>> result.trainable, result.total
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.adapters import apply_adapter
from lorakit.methods.bitfit import apply_bitfit
from lorakit.methods.finetune import apply_fttop, apply_full, check_fresh, head_modules
from lorakit.methods.prefix import apply_prefix_embed, apply_prefix_layer

__all__ = [
    "METHODS",
    "TRAINER_METHODS",
    "Method",
    "MethodResult",
    "apply_method",
    "method_of",
    "parse_options",
    "trainable_summary",
]


def _apply_lora(
    model: nn.Module, r: int = 8, alpha: float = 16.0, targets: str = "q,v", dropout: float = 0.0,
    train_head: bool = True,
) -> None:
    from lorakit import LoraConfig, inject

    saved = tuple(name for name, _ in head_modules(model)) if train_head else ()
    inject(model, LoraConfig(r=r, alpha=alpha, targets=targets, dropout=dropout, modules_to_save=saved))


@dataclass(frozen=True)
class Method:
    """A named way of choosing (and adding) the parameters that train."""

    name: str
    summary: str
    apply: Callable[..., None]  # (model, **options); modifies the model in place
    changes_forward: bool  # adds computation (adapters, prefixes) rather than only choosing parameters

    @property
    def defaults(self) -> dict[str, Any]:
        params = list(inspect.signature(self.apply).parameters.values())[1:]
        return {p.name: p.default for p in params}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "full fine-tuning: every parameter", apply_full, False),
        Method("fttop2", "only the last `layers` (2) blocks, plus the task head", apply_fttop, False),
        Method("bitfit", "only the bias vectors, plus the task head", apply_bitfit, False),
        Method("adapter_h", "Houlsby adapters after attention and after the MLP",
               lambda model, bottleneck=16, activation="relu", train_head=True: apply_adapter(
                   model, "adapter_h", bottleneck, activation, train_head), True),
        Method("adapter_l", "Lin adapter (with its own LayerNorm) after the MLP",
               lambda model, bottleneck=16, activation="relu", train_head=True: apply_adapter(
                   model, "adapter_l", bottleneck, activation, train_head), True),
        Method("adapter_p", "Pfeiffer adapter after the MLP",
               lambda model, bottleneck=16, activation="relu", train_head=True: apply_adapter(
                   model, "adapter_p", bottleneck, activation, train_head), True),
        Method("prefix_embed", "trainable virtual tokens: lp before the input, li after the prompt",
               apply_prefix_embed, True),
        Method("prefix_layer", "trainable key/value prefixes of `length` in every attention layer",
               apply_prefix_layer, True),
        Method("lora", "LoRA (lorakit.inject) on `targets` with rank r", _apply_lora, False),
    )
}


@dataclass
class MethodResult:
    """What a method made trainable."""

    method: str
    options: dict[str, Any]
    trainable_names: list[str]
    trainable: int
    total: int
    added: int  # parameters the method added to the model (adapters, prefixes, LoRA)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (f"{self.method}({opts}): {self.trainable:,} trainable of {self.total:,} parameters "
                f"({self.percent:.4f}%), {self.added:,} added")


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    """Options from the command line arrive as strings; give them the default's type."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return type(default)(value)
    except ValueError:
        raise ConfigError(
            f"{method}: option {key}={value!r} must be of type {type(default).__name__} (default {default!r})"
        ) from None


def parse_options(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["bottleneck=64", "activation=gelu"]`` (the CLI form) or a mapping → a dict of options."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method option {item!r} must look like key=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's defaults overridden by ``options``; unknown options are an error naming the valid ones."""
    method = _method(name)
    defaults = method.defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ConfigError(f"method {name!r} does not take option(s) {unknown}; its options: {accepted}")
    return {k: _coerce(name, k, options.get(k, d), d) for k, d in defaults.items()}


def trainable_summary(model: nn.Module, name: str, options: dict[str, Any], before: set[int]) -> MethodResult:
    params = list(model.named_parameters())  # tied weights appear once
    names = [n for n, p in params if p.requires_grad]
    return MethodResult(
        method=name,
        options=options,
        trainable_names=names,
        trainable=sum(p.numel() for _, p in params if p.requires_grad),
        total=sum(p.numel() for _, p in params),
        added=sum(p.numel() for _, p in params if id(p) not in before),
    )


def apply_method(model: nn.Module, name: str, **options: Any) -> MethodResult:
    """Apply method ``name`` to a fresh transformers model, in place; returns what trains."""
    method = _method(name)
    resolved = resolve_options(name, options)
    check_fresh(model)
    before = {id(p) for p in model.parameters()}
    method.apply(model, **resolved)
    result = trainable_summary(model, name, resolved, before)
    if result.trainable == 0:
        raise ConfigError(f"method {name!r} left nothing trainable on this {type(model).__name__}")
    model.lorakit_method = {"name": name, "options": resolved, "trainable": result.trainable_names}
    return result


def method_of(model: nn.Module) -> dict[str, Any] | None:
    """``{"name", "options", "trainable"}`` of the method applied to ``model``, or None."""
    return getattr(model, "lorakit_method", None)


def _trainer_entry(name: str) -> Callable[[nn.Module, Any], MethodResult]:
    """A ``(model, cfg) -> MethodResult`` for the trainer; options come from ``cfg.method_options``."""

    def prepare(model: nn.Module, cfg: Any) -> MethodResult:
        return apply_method(model, name, **parse_options(getattr(cfg, "method_options", None)))

    prepare.__name__ = f"prepare_{name}"
    return prepare


# The baselines the training pipeline does not implement itself (it owns lora, full and head).
TRAINER_METHODS: dict[str, Callable[[nn.Module, Any], MethodResult]] = {
    name: _trainer_entry(name) for name in METHODS if name not in ("lora", "full")
}
