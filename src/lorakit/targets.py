"""Targeting: turn target patterns and aliases into the exact modules (and fused slices) to adapt.

Strict by design: every pattern must match at least one adaptable module, otherwise the error lists
the candidates. A silent no-op (PEFT's weakness with a mistyped name) is the worst failure a LoRA
library can have, because training still "works".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lorakit.errors import TargetError
from lorakit.patterns import PatternError, compile_pattern

FUSED_SLICE_NAMES = ("q", "k", "v")


@dataclass(frozen=True)
class AliasRule:
    """An alias resolves to modules whose full name matches ``regex``; ``slice`` picks a third of a fused QKV."""

    regex: str
    slice: str | None = None


# Per-architecture alias tables (keyed by config.model_type). Regexes are matched against the full
# dotted module name with re.search, anchored at the end.
_LLAMA = {
    "q": [AliasRule(r"self_attn\.q_proj$")],
    "k": [AliasRule(r"self_attn\.k_proj$")],
    "v": [AliasRule(r"self_attn\.v_proj$")],
    "o": [AliasRule(r"self_attn\.o_proj$")],
    "ffn": [AliasRule(r"mlp\.(gate_proj|up_proj|down_proj)$")],
}
_BERT = {
    "q": [AliasRule(r"attention\.self\.query$")],
    "k": [AliasRule(r"attention\.self\.key$")],
    "v": [AliasRule(r"attention\.self\.value$")],
    "o": [AliasRule(r"attention\.output\.dense$")],
    # "output.dense" alone would also match attention.output.dense: anchor on the layer index.
    "ffn": [AliasRule(r"intermediate\.dense$"), AliasRule(r"layer\.\d+\.output\.dense$")],
}
_GPT2 = {
    # GPT-2 fuses q, k, v into one Conv1D (c_attn); the paper adapts only the q and v thirds.
    "q": [AliasRule(r"attn\.c_attn$", "q")],
    "k": [AliasRule(r"attn\.c_attn$", "k")],
    "v": [AliasRule(r"attn\.c_attn$", "v")],
    "o": [AliasRule(r"attn\.c_proj$")],
    "ffn": [AliasRule(r"mlp\.(c_fc|c_proj)$")],
}
ALIASES: dict[str, dict[str, list[AliasRule]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "gpt2": _GPT2,
}
# Module names that are fused q/k/v projections, and how many slices they hold.
FUSED_QKV = re.compile(r"(^|\.)c_attn$")

_REGEX_CHARS = set("^$*+?[](){}|\\")


def is_adaptable(module: nn.Module) -> bool:
    """Linear-like modules and embeddings are the layer types lorakit can wrap."""
    from lorakit.layers import LoraLayer, is_conv1d

    if isinstance(module, LoraLayer):
        return True
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def adaptable_names(model: nn.Module) -> list[str]:
    from lorakit.layers import LoraLayer

    names = []
    inside_lora = ()
    for name, module in model.named_modules():
        if inside_lora and name.startswith(inside_lora):
            continue  # the base_layer and A/B of an existing wrapper are not separate targets
        if isinstance(module, LoraLayer):
            inside_lora = (name + ".",)
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


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, tuple[str, ...] | None]:
    """Map each target pattern to modules. Returns ``{module_name: slices}`` where ``slices`` is None
    for the whole module or a tuple of fused-QKV slice names (``("q", "v")``).

    Raises TargetError when a pattern matches nothing or a matched module cannot be adapted.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    aliases = ALIASES.get(model_type or "", {})
    candidates = adaptable_names(model)
    all_names = [n for n, _ in model.named_modules() if n]
    resolved: dict[str, set[str] | None] = {}

    for pattern in targets:
        check_target_pattern(pattern)
        hits: list[tuple[str, str | None]] = []
        if pattern in aliases:
            for rule in aliases[pattern]:
                hits += [(n, rule.slice) for n in candidates if re.search(rule.regex, n)]
        elif pattern in ("q", "k", "v", "o", "ffn"):
            raise TargetError(
                f"alias {pattern!r} is not defined for model_type {model_type!r}; "
                f"aliases exist for {sorted(ALIASES)}. Name the modules instead; candidates: "
                f"{_summarise(candidates)}"
            )
        else:
            matched = [n for n in all_names if _matches_plain(pattern, n)]
            bad = [n for n in matched if n not in candidates]
            if bad and not [n for n in matched if n in candidates]:
                module = model.get_submodule(bad[0])
                raise TargetError(
                    f"target {pattern!r} matched {bad[0]!r}, a {type(module).__name__}, which lorakit cannot "
                    "adapt (supported: nn.Linear, transformers Conv1D, nn.Embedding)"
                )
            hits = [(n, None) for n in matched if n in candidates]
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
    return {
        name: None if slices is None else tuple(s for s in FUSED_SLICE_NAMES if s in slices)
        for name, slices in resolved.items()
    }
