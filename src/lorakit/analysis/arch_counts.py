"""The estimate arithmetic of each model family: how ``lorakit estimate`` reads a family's ``config.json``
into an ``ArchSpec`` and counts its parameters. The family's structure (sites, fused slices, gated MLP,
untied head) is ``lorakit.lora.arch``; a family without an entry here has no estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.analysis.arch_spec import ArchSpec

# read_config(config, model_type) -> keyword arguments of ArchSpec after name and family.
ReadConfig = Callable[[Mapping[str, Any], str], dict[str, Any]]
# param_counts(spec, attention params per layer) -> (params per layer, embeddings, final modules).
ParamCounts = Callable[["ArchSpec", int], tuple[int, int, int]]


@dataclass(frozen=True)
class FamilyCounts:
    """How estimates read and count one family.

    Attributes:
        read_config: a ``config.json`` mapping and its model type → ``ArchSpec`` fields.
        param_counts: the parameter formula, given the attention parameters of one block.
        config_types: model types whose ``config.json`` ``read_config`` reads (None: all the family's).
    """

    read_config: ReadConfig
    param_counts: ParamCounts
    config_types: tuple[str, ...] | None = None


_COUNTS: dict[str, FamilyCounts] = {}


def register_counts(family_name: str, counts: FamilyCounts) -> FamilyCounts:
    """Give a family (``lorakit.lora.arch``) its estimate formulas.

    Args:
        family_name: the family's name.
        counts: its config reader and parameter formula.
    """
    _COUNTS[family_name] = counts
    return counts


def unregister_counts(family_name: str) -> None:
    """Remove a family's estimate formulas (tests registering a made-up family).

    Args:
        family_name: the family's name.
    """
    _COUNTS.pop(family_name, None)


def counts_for(family_name: str) -> FamilyCounts | None:
    """The family's estimate formulas, or None when it has none.

    Args:
        family_name: the family's name.
    """
    return _COUNTS.get(family_name)


def all_counts() -> dict[str, FamilyCounts]:
    """Every family with estimate formulas: name → formulas (a copy)."""
    return dict(_COUNTS)


def linear_params(d_in: int, d_out: int, bias: bool) -> int:
    """Parameters of a ``d_in → d_out`` linear layer."""
    return d_in * d_out + (d_out if bias else 0)


def _gpt2_config(config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    d = int(config.get("n_embd", 768))
    return dict(hidden=d, layers=int(config.get("n_layer", 12)), heads=int(config.get("n_head", 12)),
                intermediate=int(config.get("n_inner") or 4 * d), vocab=int(config.get("vocab_size", 50257)),
                max_positions=int(config.get("n_positions", 1024)),
                tied_embeddings=bool(config.get("tie_word_embeddings", True)))  # fmt: skip


def _gpt2_counts(spec: ArchSpec, attn: int) -> tuple[int, int, int]:
    h, inner = spec.hidden, spec.intermediate
    per_layer = 2 * 2 * h + attn + linear_params(h, inner, True) + linear_params(inner, h, True)
    return per_layer, spec.vocab * h + spec.max_positions * h, 2 * h


def _llama_config(config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    attn_bias = bool(config.get("attention_bias", False))
    return dict(
        hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
        heads=int(config["num_attention_heads"]),
        intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
        kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        head_dim=config.get("head_dim") and int(config.get("head_dim")),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 biases q/k/v but not o; Llama/Mistral follow attention_bias for all four.
        qkv_bias=True if model_type == "qwen2" else attn_bias,
        o_bias=False if model_type == "qwen2" else attn_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
    )  # fmt: skip


def _llama_counts(spec: ArchSpec, attn: int) -> tuple[int, int, int]:
    h, inner = spec.hidden, spec.intermediate
    per_layer = 2 * h + attn + 2 * linear_params(h, inner, spec.mlp_bias) + linear_params(inner, h, spec.mlp_bias)
    return per_layer, spec.vocab * h, h


def _bert_config(config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    return dict(hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
                heads=int(config["num_attention_heads"]), intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]), max_positions=int(config.get("max_position_embeddings", 512)),
                type_vocab=int(config.get("type_vocab_size", 2)), pooler=True)  # fmt: skip


def _bert_counts(spec: ArchSpec, attn: int) -> tuple[int, int, int]:
    h, inner = spec.hidden, spec.intermediate
    per_layer = attn + 2 * h + linear_params(h, inner, True) + linear_params(inner, h, True) + 2 * h
    embed = (spec.vocab + spec.max_positions + spec.type_vocab) * h + 2 * h
    return per_layer, embed, linear_params(h, h, True) if spec.pooler else 0


def _deberta_config(config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    pos_att = config.get("pos_att_type") or ()
    if isinstance(pos_att, str):
        pos_att = tuple(p.strip() for p in pos_att.lower().split("|") if p.strip())
    max_pos = int(config.get("max_position_embeddings", 512))
    max_rel = int(config.get("max_relative_positions", -1))
    max_rel = max_pos if max_rel < 1 else max_rel
    buckets = int(config.get("position_buckets", -1))
    relative = bool(config.get("relative_attention", False))
    if config.get("embedding_size") not in (None, config.get("hidden_size")):
        raise ValueError("deberta-v2 with embedding_size != hidden_size is not supported")
    return dict(
        hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
        heads=int(config["num_attention_heads"]),
        intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
        head_dim=config.get("attention_head_size") and int(config.get("attention_head_size")),
        max_positions=max_pos, type_vocab=int(config.get("type_vocab_size", 0)), relative_attention=relative,
        rel_positions=2 * (buckets if buckets > 0 else max_rel) if relative else 0,
        share_att_key=bool(config.get("share_att_key", False)), pos_att_type=tuple(pos_att),
        rel_layer_norm=relative and "layer_norm" in str(config.get("norm_rel_ebd", "none")).lower(),
        conv_kernel_size=int(config.get("conv_kernel_size", 0)),
        position_biased_input=bool(config.get("position_biased_input", True)),
    )  # fmt: skip


def _deberta_counts(spec: ArchSpec, attn: int) -> tuple[int, int, int]:
    h, inner = spec.hidden, spec.intermediate
    pos_proj = 0
    if spec.relative_attention and not spec.share_att_key:
        pos_proj = sum(linear_params(h, spec.q_dim, True) for t in ("c2p", "p2c") if t in spec.pos_att_type)
    per_layer = attn + pos_proj + 2 * h + linear_params(h, inner, True) + linear_params(inner, h, True) + 2 * h
    embed = spec.vocab * h + 2 * h
    embed += spec.max_positions * h if spec.position_biased_input else 0
    embed += spec.type_vocab * h
    final = spec.rel_positions * h + (2 * h if spec.rel_layer_norm else 0)
    if spec.conv_kernel_size > 0:  # one ConvLayer after the first encoder layer: Conv1d + LayerNorm
        final += h * h * spec.conv_kernel_size + h + 2 * h
    return per_layer, embed, final


register_counts("llama", FamilyCounts(_llama_config, _llama_counts, ("llama", "mistral", "qwen2")))
register_counts("bert", FamilyCounts(_bert_config, _bert_counts, ("bert", "roberta", "xlm-roberta")))
register_counts("gpt2", FamilyCounts(_gpt2_config, _gpt2_counts))
register_counts("deberta-v2", FamilyCounts(_deberta_config, _deberta_counts))
