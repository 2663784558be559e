"""Architecture facts, one table per model family: everything lorakit knows about a family lives here.

A :class:`Family` names a family's attention and MLP projections (what the target aliases ``q k v o ffn``
resolve to), its fused projections and their slices (GPT-2's ``c_attn`` holds q, k and v), whether it
pools its first token (prefix tuning keeps that token first), how bench runs name its modules for PEFT,
and the shape and parameter-count formulas of ``lorakit.analysis.estimate``. Targeting, files, analysis,
methods and the bench all ask this module; adding a family means one :func:`register` call (an entry in
``_BUILTIN``) plus its test. Task-head names are not per family: transformers names them by task.

Pure data and arithmetic: no torch, no model is built.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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

# spec_fields(config, model_type) -> keyword arguments of estimate.ArchSpec after name and family.
SpecFields = Callable[[Mapping[str, Any], str], dict[str, Any]]
# param_counts(spec, attention params per layer) -> (params per layer, embeddings, final modules).
ParamCounts = Callable[[Any, int], tuple[int, int, int]]


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
        estimate_types: model types whose ``config.json`` ``spec_fields`` reads (default: all of them).
        spec_fields: reads a ``config.json`` into estimate ``ArchSpec`` fields (None: no estimates).
        param_counts: the parameter-count formula of estimates (None: no estimates).
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
    estimate_types: tuple[str, ...] | None = None
    spec_fields: SpecFields | None = None
    param_counts: ParamCounts | None = None

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


# -- estimate arithmetic -----------------------------------------------------------------------------------
def linear_params(d_in: int, d_out: int, bias: bool) -> int:
    """Parameters of a ``d_in → d_out`` linear layer."""
    return d_in * d_out + (d_out if bias else 0)


def _gpt2_fields(c: Mapping[str, Any], mt: str) -> dict[str, Any]:
    d = int(c.get("n_embd", 768))
    return dict(hidden=d, layers=int(c.get("n_layer", 12)), heads=int(c.get("n_head", 12)),
                intermediate=int(c.get("n_inner") or 4 * d), vocab=int(c.get("vocab_size", 50257)),
                max_positions=int(c.get("n_positions", 1024)),
                tied_embeddings=bool(c.get("tie_word_embeddings", True)))  # fmt: skip


def _gpt2_counts(a: Any, attn: int) -> tuple[int, int, int]:
    h, inner = a.hidden, a.intermediate
    per_layer = 2 * 2 * h + attn + linear_params(h, inner, True) + linear_params(inner, h, True)
    return per_layer, a.vocab * h + a.max_positions * h, 2 * h


def _llama_fields(c: Mapping[str, Any], mt: str) -> dict[str, Any]:
    attn_bias = bool(c.get("attention_bias", False))
    return dict(
        hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=int(c["num_attention_heads"]),
        intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
        kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        head_dim=c.get("head_dim") and int(c.get("head_dim")),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        # Qwen2 biases q/k/v but not o; Llama/Mistral follow attention_bias for all four.
        qkv_bias=True if mt == "qwen2" else attn_bias,
        o_bias=False if mt == "qwen2" else attn_bias,
        mlp_bias=bool(c.get("mlp_bias", False)),
    )  # fmt: skip


def _llama_counts(a: Any, attn: int) -> tuple[int, int, int]:
    h, inner = a.hidden, a.intermediate
    per_layer = 2 * h + attn + 2 * linear_params(h, inner, a.mlp_bias) + linear_params(inner, h, a.mlp_bias)
    return per_layer, a.vocab * h, h


def _bert_fields(c: Mapping[str, Any], mt: str) -> dict[str, Any]:
    return dict(hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]),
                heads=int(c["num_attention_heads"]), intermediate=int(c["intermediate_size"]),
                vocab=int(c["vocab_size"]), max_positions=int(c.get("max_position_embeddings", 512)),
                type_vocab=int(c.get("type_vocab_size", 2)), pooler=True)  # fmt: skip


def _bert_counts(a: Any, attn: int) -> tuple[int, int, int]:
    h, inner = a.hidden, a.intermediate
    per_layer = attn + 2 * h + linear_params(h, inner, True) + linear_params(inner, h, True) + 2 * h
    embed = (a.vocab + a.max_positions + a.type_vocab) * h + 2 * h
    return per_layer, embed, linear_params(h, h, True) if a.pooler else 0


def _deberta_fields(c: Mapping[str, Any], mt: str) -> dict[str, Any]:
    pos_att = c.get("pos_att_type") or ()
    if isinstance(pos_att, str):
        pos_att = tuple(p.strip() for p in pos_att.lower().split("|") if p.strip())
    max_pos = int(c.get("max_position_embeddings", 512))
    max_rel = int(c.get("max_relative_positions", -1))
    max_rel = max_pos if max_rel < 1 else max_rel
    buckets = int(c.get("position_buckets", -1))
    relative = bool(c.get("relative_attention", False))
    if c.get("embedding_size") not in (None, c.get("hidden_size")):
        raise ValueError("deberta-v2 with embedding_size != hidden_size is not supported")
    return dict(
        hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=int(c["num_attention_heads"]),
        intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
        head_dim=c.get("attention_head_size") and int(c.get("attention_head_size")),
        max_positions=max_pos, type_vocab=int(c.get("type_vocab_size", 0)), relative_attention=relative,
        rel_positions=2 * (buckets if buckets > 0 else max_rel) if relative else 0,
        share_att_key=bool(c.get("share_att_key", False)), pos_att_type=tuple(pos_att),
        rel_layer_norm=relative and "layer_norm" in str(c.get("norm_rel_ebd", "none")).lower(),
        conv_kernel_size=int(c.get("conv_kernel_size", 0)),
        position_biased_input=bool(c.get("position_biased_input", True)),
    )  # fmt: skip


def _deberta_counts(a: Any, attn: int) -> tuple[int, int, int]:
    h, inner = a.hidden, a.intermediate
    pos_proj = 0
    if a.relative_attention and not a.share_att_key:
        pos_proj = sum(linear_params(h, a.q_dim, True) for t in ("c2p", "p2c") if t in a.pos_att_type)
    per_layer = attn + pos_proj + 2 * h + linear_params(h, inner, True) + linear_params(inner, h, True) + 2 * h
    embed = a.vocab * h + 2 * h
    embed += a.max_positions * h if a.position_biased_input else 0
    embed += a.type_vocab * h
    final = a.rel_positions * h + (2 * h if a.rel_layer_norm else 0)
    if a.conv_kernel_size > 0:  # one ConvLayer after the first encoder layer: Conv1d + LayerNorm
        final += h * h * a.conv_kernel_size + h + 2 * h
    return per_layer, embed, final


def _sites(*modules: str) -> tuple[Site, ...]:
    return tuple(Site(m) for m in modules)


_BUILTIN = (
    Family(
        "llama", ("llama", "mistral", "qwen2", "qwen3", "gemma"), r"layers\.\d+\.",
        {"q": _sites("self_attn.q_proj"), "k": _sites("self_attn.k_proj"), "v": _sites("self_attn.v_proj"),
         "o": _sites("self_attn.o_proj"), "ffn": _sites("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
        layer_prefix="model.layers.{i}.", gated_mlp=True, untied_head=True,
        estimate_types=("llama", "mistral", "qwen2"), spec_fields=_llama_fields, param_counts=_llama_counts,
    ),
    Family(
        "bert", ("bert", "roberta", "xlm-roberta", "electra"), r"layer\.\d+\.",
        {"q": _sites("attention.self.query"), "k": _sites("attention.self.key"),
         "v": _sites("attention.self.value"), "o": _sites("attention.output.dense"),
         "ffn": _sites("intermediate.dense", "output.dense")},
        layer_prefix="encoder.layer.{i}.", pools_first_token=True,
        estimate_types=("bert", "roberta", "xlm-roberta"), spec_fields=_bert_fields, param_counts=_bert_counts,
    ),
    Family(
        # GPT-2 fuses q, k, v into one Conv1D (c_attn); the paper adapts only the q and v thirds.
        "gpt2", ("gpt2",), r"h\.\d+\.",
        {"q": (Site("attn.c_attn", "q"),), "k": (Site("attn.c_attn", "k"),), "v": (Site("attn.c_attn", "v"),),
         "o": _sites("attn.c_proj"), "ffn": _sites("mlp.c_fc", "mlp.c_proj")},
        layer_prefix="transformer.h.{i}.", fused={"attn.c_attn": QKV_SLICES}, transposed_weights=True,
        untied_head=True, spec_fields=_gpt2_fields, param_counts=_gpt2_counts,
    ),
    Family(
        "deberta-v2", ("deberta-v2",), r"layer\.\d+\.",
        {"q": _sites("attention.self.query_proj"), "k": _sites("attention.self.key_proj"),
         "v": _sites("attention.self.value_proj"), "o": _sites("attention.output.dense"),
         "ffn": _sites("intermediate.dense", "output.dense")},
        layer_prefix="encoder.layer.{i}.", pools_first_token=True,
        spec_fields=_deberta_fields, param_counts=_deberta_counts,
    ),
)  # fmt: skip
for _family in _BUILTIN:
    register(_family)
