"""Architecture facts, one table per model family: everything lorakit knows about a family lives here.

A :class:`Family` names a family's attention and MLP projections (what the target aliases ``q k v o ffn``
resolve to), its fused projections and their slices (GPT-2's ``c_attn`` holds q, k and v), whether it
pools its first token (prefix tuning keeps that token first), how bench runs name its modules for PEFT,
and the shape facts estimates need (their formulas are ``lorakit.analysis.arch_counts``). Targeting, files,
analysis, methods and the bench all ask this module; adding a family means one :func:`register` call (an entry in
``_BUILTIN``) plus its test. Task-head names are not per family: transformers names them by task.

Pure data and arithmetic: no torch, no model is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TARGET_ALIASES: tuple[str, ...] = ("q", "k", "v", "o", "ffn")
# Children of transformers' task models that hold a freshly initialised task head.
TASK_HEAD_NAMES: tuple[str, ...] = ("classifier", "score", "classification_head", "qa_outputs")
# The child of a backbone that pools the first token for a head reading it (BERT family).
POOLER_NAME = "pooler"
# The slices of a fused query/key/value projection, in output-column order (GPT-2's c_attn).
QKV_SLICES: tuple[str, ...] = ("q", "k", "v")
# Attributes under which transformers' attention modules keep their dropout rate as a plain float (read
# at every forward, e.g. Llama's ``attention_dropout``); other dropout lives in ``nn.Dropout`` modules.
FLOAT_DROPOUT_ATTRIBUTES: tuple[str, ...] = ("attention_dropout", "dropout", "dropout_p", "dropout_prob",
                                             "attn_drop", "attn_dropout")  # fmt: skip


@dataclass(frozen=True)
class Site:
    """One adapted matrix of a block: a module (relative to the block) and, for a fused one, its slice."""

    module: str
    slice: str | None = None

    @property
    def path(self) -> str:
        """The module path with the slice appended (``attn.c_attn.q``), as estimates and analysis name it."""
        return self.module if self.slice is None else f"{self.module}.{self.slice}"


@dataclass(frozen=True)
class Family:
    """The facts of one model family.

    Attributes:
        name: the family's name (``ArchSpec.family`` in estimates).
        model_types: the transformers ``config.model_type`` values that belong to it.
        block: regex of the name prefix of one transformer block (``layers\\.\\d+\\.``).
        targets: alias → the sites it adapts, in order (``ffn`` of a gated MLP: gate, up, down).
        fused: fused module (relative to a block) → its slices in output-column order.
        layer_prefix: the full-name prefix of block ``i`` as PEFT keys use it (``model.layers.{i}.``).
        pools_first_token: whether a head reads the first token (prefix tokens must not displace it).
        transposed_weights: whether projections store W as (in, out) (PEFT's ``fan_in_fan_out``).
        gated_mlp: whether the MLP has gate and up projections (shapes in estimates).
        untied_head: whether an untied LM head counts in the total (causal LMs).
        shared_input: groups of sibling projections (relative to a block) that read the same input, which a
            server may multiply as one product (``lorakit.lora.packed``).
    """

    name: str
    model_types: tuple[str, ...]
    block: str
    targets: Mapping[str, tuple[Site, ...]]
    layer_prefix: str
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pools_first_token: bool = False
    transposed_weights: bool = False
    gated_mlp: bool = False
    untied_head: bool = False
    shared_input: tuple[tuple[str, ...], ...] = ()

    def alias_patterns(self, alias: str) -> list[tuple[re.Pattern[str], str | None]]:
        """(regex over full module names, slice) for each site of ``alias``; [] when it has none."""
        return [
            (re.compile(rf"(^|\.){self.block}{re.escape(site.module)}$"), site.slice)
            for site in self.targets.get(alias, ())
        ]

    @property
    def output_sites(self) -> tuple[str, str]:
        """(attention output projection, MLP output projection) of a block: where bottleneck adapters go."""
        return self.targets["o"][-1].module, self.targets["ffn"][-1].module

    def peft_modules(self, aliases: tuple[str, ...] | list[str]) -> list[str]:
        """PEFT ``target_modules`` for lorakit aliases (PEFT adapts a fused projection whole)."""
        return sorted({site.module for a in aliases for site in self.targets[a]})


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace) a family; every module asking :func:`family_of` sees it at once.

    Args:
        family: the family's table.

    Raises:
        ValueError: when a model type already belongs to another family, or a target slice is unknown.
    """
    for mt in family.model_types:
        owner = family_for_type(mt)
        if owner is not None and owner.name != family.name:
            raise ValueError(f"model_type {mt!r} already belongs to family {owner.name!r}")
    for alias, sites in family.targets.items():
        for site in sites:
            if site.slice is not None and site.slice not in family.fused.get(site.module, ()):
                raise ValueError(f"{family.name}: alias {alias!r} names slice {site.slice!r} of {site.module!r}, "
                                 f"which is not a fused module with that slice")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove family ``name`` (tests that register a family of their own clean up with this).

    Args:
        name: the family's name.
    """
    _FAMILIES.pop(name, None)


def families() -> dict[str, Family]:
    """All known families by name, in registration order."""
    return dict(_FAMILIES)


def family(name: str) -> Family:
    """The family called ``name``.

    Args:
        name: a family name (``llama``, ``bert``, ``gpt2``, ...).

    Raises:
        ValueError: naming the known families.
    """
    if name not in _FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_for_type(model_type: str | None) -> Family | None:
    """The family a transformers ``model_type`` belongs to, or None.

    Args:
        model_type: ``config.model_type`` of a model.
    """
    return next((f for f in _FAMILIES.values() if model_type in f.model_types), None)


def model_type_of(model: Any) -> str | None:
    """``model.config.model_type``, or None for a model without one."""
    return getattr(getattr(model, "config", None), "model_type", None)


def family_of(model: Any) -> Family | None:
    """The family of a model (by its ``config.model_type``), or None when lorakit has no table for it.

    Args:
        model: a transformers model (anything with ``config.model_type``).
    """
    return family_for_type(model_type_of(model))


def known_model_types() -> list[str]:
    """Every model type some family covers, sorted."""
    return sorted(mt for f in _FAMILIES.values() for mt in f.model_types)


def fused_slices(family_or_none: Family | None, module_name: str) -> tuple[str, ...]:
    """The slice names of a fused module (full or block-relative name), in output order; () if not fused.

    Args:
        family_or_none: the model's family (None: no fused modules known).
        module_name: the module's name.
    """
    if family_or_none is None:
        return ()
    for rel, slices in family_or_none.fused.items():
        if module_name == rel or module_name.endswith("." + rel):
            return slices
    return ()


def slice_span(out_features: int, slices: tuple[str, ...], name: str) -> tuple[int, int]:
    """Output columns [start, stop) of slice ``name`` of a fused projection split evenly into ``slices``.

    Args:
        out_features: the fused projection's output width.
        slices: its slice names in output order.
        name: the slice wanted.

    Raises:
        ValueError: when the width does not divide evenly, or ``name`` is not a slice.
    """
    if name not in slices:
        raise ValueError(f"{name!r} is not a slice of a fused projection with slices {slices}")
    if out_features % len(slices):
        raise ValueError(f"fused projection has {out_features} outputs, not divisible into {'/'.join(slices)}")
    width = out_features // len(slices)
    i = slices.index(name)
    return i * width, (i + 1) * width


def _sites(*modules: str) -> tuple[Site, ...]:
    return tuple(Site(m) for m in modules)


_BUILTIN = (
    Family(
        "llama", ("llama", "mistral", "qwen2", "qwen3", "gemma"), r"layers\.\d+\.",
        {"q": _sites("self_attn.q_proj"), "k": _sites("self_attn.k_proj"), "v": _sites("self_attn.v_proj"),
         "o": _sites("self_attn.o_proj"), "ffn": _sites("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
        layer_prefix="model.layers.{i}.", gated_mlp=True, untied_head=True,
        shared_input=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    ),
    Family(
        "bert", ("bert", "roberta", "xlm-roberta", "electra"), r"layer\.\d+\.",
        {"q": _sites("attention.self.query"), "k": _sites("attention.self.key"),
         "v": _sites("attention.self.value"), "o": _sites("attention.output.dense"),
         "ffn": _sites("intermediate.dense", "output.dense")},
        layer_prefix="encoder.layer.{i}.", pools_first_token=True,
    ),
    Family(
        # GPT-2 fuses q, k, v into one Conv1D (c_attn); the paper adapts only the q and v thirds.
        "gpt2", ("gpt2",), r"h\.\d+\.",
        {"q": (Site("attn.c_attn", "q"),), "k": (Site("attn.c_attn", "k"),), "v": (Site("attn.c_attn", "v"),),
         "o": _sites("attn.c_proj"), "ffn": _sites("mlp.c_fc", "mlp.c_proj")},
        layer_prefix="transformer.h.{i}.", fused={"attn.c_attn": QKV_SLICES}, transposed_weights=True,
        untied_head=True,
    ),
    Family(
        "deberta-v2", ("deberta-v2",), r"layer\.\d+\.",
        {"q": _sites("attention.self.query_proj"), "k": _sites("attention.self.key_proj"),
         "v": _sites("attention.self.value_proj"), "o": _sites("attention.output.dense"),
         "ffn": _sites("intermediate.dense", "output.dense")},
        layer_prefix="encoder.layer.{i}.", pools_first_token=True,
    ),
)  # fmt: skip
for _family in _BUILTIN:
    register(_family)
