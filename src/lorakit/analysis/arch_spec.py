"""The architecture a cost estimate reads: ``ArchSpec`` (sizes and layout of one model), the presets of
the papers' and built-in models, a spec from a ``config.json``, and the exact parameter count.

No model is built: the family's layout is ``lorakit.lora.arch``, its formulas ``lorakit.analysis.arch_counts``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.analysis.arch_counts import all_counts, counts_for, linear_params
from lorakit.lora import arch as _arch


@dataclass(frozen=True)
class ArchSpec:
    """The architecture facts the arithmetic needs.

    ``family`` picks the layout: "gpt2" (fused c_attn, learned positions, LayerNorm), "llama"
    (RMSNorm, gated MLP, grouped-query attention, rotary positions), "bert" (BERT/RoBERTa encoders,
    counted with their pooler as in ``BertModel``) or "deberta-v2" (``DebertaV2Model``).
    """

    name: str
    family: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: int | None = None
    head_dim: int | None = None
    max_positions: int = 0
    type_vocab: int = 0
    tied_embeddings: bool = True
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    pooler: bool = False
    # DeBERTa-v2 only: disentangled relative attention and the encoder's extra modules.
    relative_attention: bool = False
    rel_positions: int = 0  # rows of encoder.rel_embeddings
    share_att_key: bool = True
    pos_att_type: tuple[str, ...] = ()
    rel_layer_norm: bool = False
    conv_kernel_size: int = 0
    position_biased_input: bool = True

    def __post_init__(self) -> None:
        _arch.family(self.family)  # raises ValueError naming the known families
        if counts_for(self.family) is None:
            raise ValueError(f"family {self.family!r} has no estimate formulas (lorakit.analysis.arch_counts)")
        for attr in ("hidden", "layers", "heads", "intermediate", "vocab"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{attr} must be positive, got {getattr(self, attr)}")

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.d_head

    def matrices(self, target: str) -> list[tuple[str, int, int]]:
        """(module path relative to a layer, d_in, d_out) of the weight matrices a target names."""
        fam = _arch.family(self.family)
        h, inner = self.hidden, self.intermediate
        shapes = {
            "q": [(h, self.q_dim)],
            "k": [(h, self.kv_dim)],
            "v": [(h, self.kv_dim)],
            "o": [(self.q_dim, h)],
            # Gated MLPs (Llama) have gate and up (h -> I) and down (I -> h); the others fc1/fc2.
            "ffn": [(h, inner), (h, inner), (inner, h)] if fam.gated_mlp else [(h, inner), (inner, h)],
        }[target]
        sites = fam.targets[target]
        return [(site.path, d_in, d_out) for site, (d_in, d_out) in zip(sites, shapes, strict=True)]

    def layer_prefix(self, i: int) -> str:
        """The full-name prefix of block ``i`` (``model.layers.3.``), as PEFT keys use it."""
        return _arch.family(self.family).layer_prefix.format(i=i)


def _gpt2(name: str, d: int, layers: int, heads: int, vocab: int = 50257, ctx: int = 1024) -> ArchSpec:
    return ArchSpec(name, "gpt2", d, layers, heads, 4 * d, vocab, max_positions=ctx)


def _bert(name: str, d: int, layers: int, heads: int, vocab: int, positions: int, types: int) -> ArchSpec:
    return ArchSpec(
        name, "bert", d, layers, heads, 4 * d, vocab, max_positions=positions, type_vocab=types, pooler=True
    )


# Architecture facts of the paper's models and of lorakit's two shipped models.
PRESETS: dict[str, ArchSpec] = {
    "gpt3-175b": _gpt2("gpt3-175b", 12288, 96, 96, ctx=2048),
    "gpt2": _gpt2("gpt2", 768, 12, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 24, 16),
    "gpt2-large": _gpt2("gpt2-large", 1280, 36, 20),
    "roberta-base": _bert("roberta-base", 768, 12, 12, 50265, 514, 1),
    "roberta-large": _bert("roberta-large", 1024, 24, 16, 50265, 514, 1),
    # microsoft/deberta-v2-xxlarge config.json
    "deberta-xxl": ArchSpec(
        "deberta-xxl",
        "deberta-v2",
        1536,
        48,
        24,
        6144,
        128100,
        max_positions=512,
        relative_attention=True,
        rel_positions=2 * 256,
        share_att_key=True,
        pos_att_type=("p2c", "c2p"),
        rel_layer_norm=True,
        conv_kernel_size=3,
        position_biased_input=False,
    ),
    "smollm2-135m": ArchSpec(
        "smollm2-135m",
        "llama",
        576,
        30,
        9,
        1536,
        49152,
        kv_heads=3,
        head_dim=64,
        tied_embeddings=True,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
    ),
    "minilm-l6": ArchSpec(
        "minilm-l6", "bert", 384, 6, 12, 1536, 30522, max_positions=512, type_vocab=2, pooler=True
    ),
}
ALIASES: dict[str, str] = {
    "gpt3": "gpt3-175b",
    "gpt-3": "gpt3-175b",
    "gpt2-small": "gpt2",
    "gpt2-m": "gpt2-medium",
    "gpt2-l": "gpt2-large",
    "deberta-v2-xxlarge": "deberta-xxl",
    "roberta-base-125m": "roberta-base",
    "all-minilm-l6-v2": "minilm-l6",
}


def arch_from_config(config: Mapping[str, Any], name: str = "config") -> ArchSpec:
    """ArchSpec from a transformers ``config.json`` dictionary; each family reads its own
    (``lorakit.analysis.arch_counts``).

    Args:
        config: the parsed ``config.json``.
        name: the name the spec carries.

    Raises:
        ValueError: for a model type no family estimates, naming the supported ones.
    """
    mt = str(config.get("model_type", "")).lower()
    families = _arch.families()
    supported = [
        (family_name, counts, t) for family_name, counts in all_counts().items() if family_name in families
        for t in (counts.config_types or families[family_name].model_types)
    ]  # fmt: skip
    for family_name, counts, model_type in supported:
        if model_type == mt:
            return ArchSpec(name, family_name, **counts.read_config(config, mt))
    raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(t for _, _, t in supported)}")


def load_arch(model: ArchSpec | str | Path) -> ArchSpec:
    """An ArchSpec from itself, a preset name, a ``config.json`` file or a folder holding one."""
    if isinstance(model, ArchSpec):
        return model
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        with path.open() as f:
            return arch_from_config(json.load(f), name=str(model))
    key = str(model).lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    raise ValueError(f"{model!r} is neither a config.json/folder nor a preset; presets: {', '.join(PRESETS)}")


def total_params(arch_spec: ArchSpec) -> int:
    """Parameter count of the model: backbone plus (untied) LM head for causal LMs; encoders with
    their pooler (BERT/RoBERTa, as ``BertModel``); task heads excluded. Per-family terms:
    ``lorakit.analysis.arch_counts``.

    Args:
        arch_spec: the architecture.
    """
    spec, h, lin = arch_spec, arch_spec.hidden, linear_params
    attn = lin(h, spec.q_dim, spec.qkv_bias) + 2 * lin(h, spec.kv_dim, spec.qkv_bias) + lin(spec.q_dim, h, spec.o_bias)
    counts = counts_for(spec.family)
    assert counts is not None  # ArchSpec refuses a family without formulas
    per_layer, embed, final = counts.param_counts(spec, attn)
    head = spec.vocab * h if _arch.family(spec.family).untied_head and not spec.tied_embeddings else 0
    return embed + spec.layers * per_layer + final + head
