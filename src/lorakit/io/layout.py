"""PEFT's adapter layout: the two file names, the tensor keys, and the parsed form of an adapter.

lorakit writes exactly PEFT's keys (``base_model.model.<module>.lora_A.weight`` ...), plus ``.q``-style
keys for the slices of a fused projection, which PEFT cannot load (its target list says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lorakit.lora.arch import QKV_SLICES, families
from lorakit.lora.config import LoraConfig
from lorakit.lora.kinds import LayerKind
from lorakit.lora.layers import WHOLE

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT reports an unknown target module by name, so a per-slice adapter fails loudly there instead of
# silently loading into the whole fused projection.
PEFT_UNSUPPORTED_TARGET = "lorakit-per-slice-fused-qkv-adapter-cannot-be-loaded-by-peft"


def _key_pattern() -> re.Pattern[str]:
    """PEFT's tensor keys, with lorakit's per-slice keys for every fused slice a family declares."""
    slices = sorted({s for f in families().values() for group in f.fused.values() for s in group} | set(QKV_SLICES))
    alternatives = "|".join(re.escape(s) for s in slices)
    return re.compile(
        rf"^(?P<module>.+?)\.(?:(?P<ab>lora_[AB])(?:\.(?P<slice>{alternatives}))?\.weight|(?P<emb>lora_embedding_[AB])"
        r"|(?P<mag>lora_magnitude_vector))$"
    )


def tensor_key(layer_name: str, kind: LayerKind, slot: str, which: str) -> str:
    """The file key of one LoRA tensor, as PEFT names it (lorakit adds ``.q``-style keys for slices).

    Args:
        layer_name: the adapted module's name.
        kind: its layer kind (embeddings use ``lora_embedding_A``, a bare parameter).
        slot: ``WHOLE`` or a fused slice's name.
        which: ``"A"`` or ``"B"``.
    """
    if kind.file_style == "embedding":
        return f"{PREFIX}{layer_name}.lora_embedding_{which}"
    suffix = "" if slot == WHOLE else f".{slot}"
    return f"{PREFIX}{layer_name}.lora_{which}{suffix}.weight"


@dataclass
class AdapterFile:
    """A parsed adapter: config, per-module LoRA pairs, and the extra trained tensors."""

    config: LoraConfig
    raw_config: dict[str, Any]
    # module → {slice key (WHOLE, q, k, v): (A, B)}
    pairs: dict[str, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    embedding_modules: set[str] = field(default_factory=set)
    magnitudes: dict[str, Tensor] = field(default_factory=dict)  # module → DoRA's lora_magnitude_vector
    biases: dict[str, Tensor] = field(default_factory=dict)  # module → bias of its base layer
    saved_modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module → its state

    def lora_matrices(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{module[.slice]: (A, B, scaling)} for analysis."""
        out = {}
        for module, slices in self.pairs.items():
            for key, (a, b) in slices.items():
                out[module if key == WHOLE else f"{module}.{key}"] = (a, b, self.config.scaling_for(module))
        return out
