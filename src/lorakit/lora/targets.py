"""Targeting: turn target patterns and aliases into the exact modules (and fused slices) to adapt.

Strict by design: every pattern must match at least one adaptable module, otherwise the error lists
the candidates. A silent no-op (PEFT's weakness with a mistyped name) is the worst failure a LoRA
library can have, because training still "works".
"""

from __future__ import annotations

import re

from torch import nn

from lorakit.errors import TargetError
from lorakit.lora.arch import (
    QKV_SLICES,
    TARGET_ALIASES,
    TASK_HEAD_NAMES,
    family_of,
    fused_slices,
    known_model_types,
    model_type_of,
)
from lorakit.lora.kinds import AdapterHost, find_kind, supported_names
from lorakit.lora.patterns import PatternError, compile_pattern

_REGEX_CHARS = set("^$*+?[](){}|\\")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output and task heads


def is_adaptable(module: nn.Module) -> bool:
    """Whether lorakit can wrap ``module``: some layer kind accepts it, or it is a LoRA layer already."""
    if isinstance(module, AdapterHost):
        return module.TARGETABLE
    return find_kind(module) is not None


def adaptable_names(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` a target may resolve to, in module order.

    Args:
        model: any module (with or without adapters).
    """
    names = []
    inside_host = ()
    for name, module in model.named_modules():
        if inside_host and name.startswith(inside_host):
            continue  # the base_layer and adapter state of an existing wrapper are not separate targets
        if isinstance(module, AdapterHost) and module.TARGETABLE:
            inside_host = (name + ".",)
            names.append(name)
        elif is_adaptable(module) and name:
            names.append(name)
    return names


def _summarise(names: list[str], limit: int = 40) -> str:
    """Collapse layer indices so the candidate list stays short: layers.0.q, layers.1.q → layers.*.q."""
    collapsed = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})
    text = ", ".join(collapsed[:limit])
    return text + (f", ... ({len(collapsed) - limit} more)" if len(collapsed) > limit else "")


def check_target_pattern(pattern: str) -> None:
    """Refuse a target that is neither a plain name nor a valid (RE2) regular expression.

    Args:
        pattern: one entry of ``targets``.

    Raises:
        TargetError: naming the pattern and what is wrong with it.
    """
    if any(c in _REGEX_CHARS for c in pattern):
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            raise TargetError(f"target {exc}") from None


def _matches_plain(pattern: str, name: str) -> bool:
    if any(c in _REGEX_CHARS for c in pattern):
        # RE2: linear in the name, so a pattern like (.+)+X cannot hang target resolution.
        return compile_pattern(pattern).fullmatch(name) is not None
    return name == pattern or name.endswith("." + pattern)


def _alias_hits(model: nn.Module, pattern: str, candidates: list[str]) -> list[tuple[str, str | None]]:
    """(module, slice) pairs an alias resolves to on ``model``'s family; an error if the family has none."""
    family = family_of(model)
    rules = family.alias_patterns(pattern) if family is not None else []
    if not rules:
        raise TargetError(
            f"alias {pattern!r} is not defined for model_type {model_type_of(model)!r}; "
            f"aliases exist for {known_model_types()}. Name the modules instead; candidates: "
            f"{_summarise(candidates)}"
        )
    return [(n, slice_name) for regex, slice_name in rules for n in candidates if regex.search(n)]


def _name_hits(model: nn.Module, pattern: str, candidates: list[str]) -> list[tuple[str, str | None]]:
    """Whole modules a plain name or regex matches; an error if it only matches modules lorakit cannot wrap."""
    matched = [n for n, _ in model.named_modules() if n and _matches_plain(pattern, n)]
    hits = [(n, None) for n in matched if n in candidates]
    bad = [n for n in matched if n not in candidates]
    if bad and not hits:
        module = model.get_submodule(bad[0])
        raise TargetError(
            f"target {pattern!r} matched {bad[0]!r}, a {type(module).__name__}, which lorakit cannot "
            f"adapt (supported: {supported_names()})"
        )
    return hits


def _all_linear_hits(model: nn.Module, candidates: list[str]) -> list[tuple[str, str | None]]:
    """PEFT's ``all-linear``: every linear layer (Linear, Conv1D) except the output head and task heads."""
    excluded = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if head is not None and (module is head or getattr(module, "base_layer", None) is head):
            excluded.add(name)
        elif name in TASK_HEAD_NAMES or name.split(".")[0] in TASK_HEAD_NAMES:
            excluded.add(name)  # a task head (and anything inside it) is trained in full, not adapted
    hits = []
    for name in candidates:
        kind = find_kind(getattr(model.get_submodule(name), "base_layer", model.get_submodule(name)))
        if kind is not None and kind.file_style == "linear" and name not in excluded:
            hits.append((name, None))
    return hits


def _pattern_hits(model: nn.Module, pattern: str, candidates: list[str]) -> list[tuple[str, str | None]]:
    check_target_pattern(pattern)
    if pattern in TARGET_ALIASES:
        return _alias_hits(model, pattern, candidates)
    if pattern == ALL_LINEAR:
        return _all_linear_hits(model, candidates)
    return _name_hits(model, pattern, candidates)


def _layer_index(model: nn.Module, name: str) -> int | None:
    """The block index in a module name (the family's block pattern, else the first ``.<n>.``)."""
    family = family_of(model)
    block = family.block if family is not None else r"(?:^|\.)[A-Za-z_]\w*\.\d+\."
    match = re.search(block.replace(r"\d+", r"(\d+)", 1), name + ".")
    return int(match.group(1)) if match else None


def _keep_layers(model: nn.Module, resolved: dict[str, set[str] | None], layers: tuple[int, ...]) -> None:
    """Drop modules outside blocks ``layers``; strict: every index must keep at least one module."""
    index_of = {name: _layer_index(model, name) for name in resolved}
    missing = [i for i in layers if i not in index_of.values()]
    if missing:
        present = sorted({i for i in index_of.values() if i is not None})
        raise TargetError(f"layers {missing} hold no targeted module; the targets lie in layers {present}")
    for name, index in index_of.items():
        if index not in layers:
            del resolved[name]


def _apply_exclude(model: nn.Module, resolved: dict[str, set[str] | None], exclude: tuple[str, ...]) -> None:
    """Remove what each exclude pattern matches; strict: a pattern that removes nothing is an error."""
    candidates = adaptable_names(model)
    for pattern in exclude:
        try:
            hits = [(n, sl) for n, sl in _pattern_hits(model, pattern, candidates) if n in resolved]
        except TargetError:
            hits = []
        if not hits:
            raise TargetError(
                f"exclude {pattern!r} matches none of the {len(resolved)} targeted modules "
                f"({_summarise(list(resolved))}); a no-op exclude is refused like a no-op target"
            )
        for name, slice_name in hits:
            current = resolved.get(name, "absent")
            if slice_name is None or current is None:
                resolved.pop(name, None)  # excluding a slice of a whole-module target drops the module
            elif isinstance(current, set):
                current.discard(slice_name)
                if not current:
                    del resolved[name]
    if not resolved:
        raise TargetError("exclude removed every targeted module")


def _slice_order(model: nn.Module, name: str) -> tuple[str, ...]:
    return fused_slices(family_of(model), name) or QKV_SLICES


def resolve_targets(
    model: nn.Module,
    targets: tuple[str, ...] | list[str],
    *,
    exclude: tuple[str, ...] | list[str] = (),
    layers: tuple[int, ...] | None = None,
) -> dict[str, tuple[str, ...] | None]:
    """Map each target pattern to modules: aliases through the model's family (``lorakit.lora.arch``),
    ``all-linear`` (every linear layer but the output and task heads, as PEFT), other patterns as module
    names (suffix at a dot boundary) or RE2 regular expressions (full match).

    Args:
        model: the model to adapt.
        targets: aliases (``q k v o ffn``), ``all-linear``, module names or regexes.
        exclude: patterns of the same kinds whose modules (or slices) are removed again.
        layers: keep only modules in the blocks with these indices.

    Returns:
        ``{module_name: slices}`` where ``slices`` is None for the whole module or a tuple of fused slice
        names in output order (``("q", "v")``).

    Raises:
        TargetError: when a pattern matches nothing or a matched module cannot be adapted, an exclude
            removes nothing, or a layer index holds no targeted module.
    """
    candidates = adaptable_names(model)
    resolved: dict[str, set[str] | None] = {}
    for pattern in targets:
        hits = _pattern_hits(model, pattern, candidates)
        if not hits:
            raise TargetError(
                f"target {pattern!r} matched no module of this {type(model).__name__}. "
                f"Adaptable modules: {_summarise(candidates)}"
            )
        for name, slice_name in hits:
            if slice_name is None:
                resolved[name] = None  # the whole module wins over any slice request
            elif not (name in resolved and resolved[name] is None):
                resolved.setdefault(name, set()).add(slice_name)  # type: ignore[union-attr]
    if layers is not None:
        _keep_layers(model, resolved, tuple(layers))
    _apply_exclude(model, resolved, tuple(exclude))
    return {
        name: None if slices is None else tuple(s for s in _slice_order(model, name) if s in slices)
        for name, slices in resolved.items()
    }
