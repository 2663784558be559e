"""The one method registry: a ``Method`` is prepare + trainable parameters + save + load, by name.

Everything that turns a method name into code asks ``get_method``: ``apply_method`` (the Python API), the
trainer (``lorakit train --method``), ``load_method`` / ``lorakit eval`` and ``lorakit compare``. The built-in
methods are registered by ``lorakit.methods``; ``register_method`` adds one more, reachable from all of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import ConfigError

Saver = Callable[[nn.Module, "str | Path"], Path]
Loader = Callable[[nn.Module, "str | Path"], Any]


def options_from_method_options(cfg: Any) -> dict[str, Any]:
    """A training config's ``method_options`` (``["key=value", ...]``) as a method's options."""
    return parse_options(getattr(cfg, "method_options", None))


@dataclass(frozen=True)
class Method:
    """A named way of choosing (and adding) the parameters that train, and of saving what they learned.

    Attributes:
        name: the name ``--method`` and ``apply_method`` take.
        summary: one line for listings.
        apply: ``(model, **options)``; freezes, adds and unfreezes in place. Its keyword defaults are the
            method's options (and their types, for command-line strings).
        changes_forward: adds computation (adapters, prefixes) rather than only choosing parameters.
        save: ``(model, path)`` writes the trained state to a directory.
        load: ``(fresh_model, path)`` rebuilds the method on a fresh base model and loads the state.
        files: the names of the files ``save`` writes (config first).
        options_from_config: a training config → this method's options (the trainer's entry).
    """

    name: str
    summary: str
    apply: Callable[..., None]
    changes_forward: bool
    save: Saver
    load: Loader
    files: tuple[str, ...]
    options_from_config: Callable[[Any], dict[str, Any]] = field(default=options_from_method_options)

    @property
    def defaults(self) -> dict[str, Any]:
        """The method's options with their default values."""
        params = list(inspect.signature(self.apply).parameters.values())[1:]
        return {p.name: p.default for p in params}

    def prepare(self, model: nn.Module, **options: Any) -> MethodResult:
        """Apply this method to a fresh model in place (see ``apply_method``)."""
        return apply_method(model, self.name, **options)

    def prepare_for_training(self, model: nn.Module, cfg: Any) -> MethodResult:
        """Apply this method with the options a training config carries.

        Args:
            model: a freshly loaded transformers model.
            cfg: a ``TrainConfig`` (or anything with its fields).
        """
        return self.prepare(model, **self.options_from_config(cfg))

    @staticmethod
    def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters this method left trainable, by name (tied weights once)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


METHODS: dict[str, Method] = {}


def add_method(method: Method) -> Method:
    """Put ``method`` into the registry; a different method under a taken name is an error."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ConfigError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name is an error listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def known_methods() -> list[str]:
    """Every registered method name, sorted."""
    return sorted(METHODS)


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
    """``["bottleneck=64", "activation=gelu"]`` (the CLI form) or a mapping → a dict of options.

    Args:
        items: ``key=value`` strings, a mapping, or None (no options).
    """
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


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's defaults overridden by ``options``; unknown options are an error naming the valid ones.

    Args:
        name: a registered method.
        options: option values (strings are converted to the default's type).
    """
    defaults = get_method(name).defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ConfigError(f"method {name!r} does not take option(s) {unknown}; its options: {accepted}")
    return {k: _coerce(name, k, options.get(k, d), d) for k, d in defaults.items()}


def trainable_summary(model: nn.Module, name: str, options: dict[str, Any], before: set[int]) -> MethodResult:
    """Count what trains after method ``name`` ran; ``before`` holds the ids of the parameters it found."""
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


def check_fresh(model: nn.Module) -> None:
    """Methods start from a plain transformers model: refuse one already carrying a method or LoRA."""
    if getattr(model, "lorakit_method", None):
        raise ConfigError(
            f"this model already has method {model.lorakit_method['name']!r} applied; load a fresh base model"
        )
    if getattr(model, "lorakit_configs", None):
        raise ConfigError(
            "this model already carries LoRA adapters; apply baseline methods to a fresh base model"
        )


def apply_method(model: nn.Module, name: str, **options: Any) -> MethodResult:
    """Apply method ``name`` to a fresh transformers model, in place; returns what trains.

    Args:
        model: a freshly loaded model (no method or LoRA applied yet).
        name: a registered method (``lorakit.methods.METHODS``).
        **options: the method's options; the rest keep their defaults.
    """
    method = get_method(name)
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
