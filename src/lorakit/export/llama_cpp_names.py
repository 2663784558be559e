"""How llama.cpp names and lays out a Hugging Face model's tensors, for the architectures lorakit exports.

Names come from the ``gguf`` package's own ``TensorNameMap`` (the table llama.cpp's converters use). The
one layout change written here by hand is ``LlamaModel.permute`` from llama.cpp's ``convert_hf_to_gguf.py``:
the converter reorders the rows of ``q_proj``/``k_proj`` for llama.cpp's RoPE, so any update to those
weights (a merged weight, or the rows of a LoRA B) must be reordered the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from lorakit.errors import ExportError

# transformers' model_type → llama.cpp architecture, for the families whose layout this module knows.
ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {"llama": gguf.MODEL_ARCH.LLAMA}


@dataclass(frozen=True)
class Layout:
    """What the tensor names and the q/k row order of one base model depend on."""

    model_type: str
    n_layers: int
    n_head: int
    n_kv_head: int
    tied_embeddings: bool

    @property
    def arch_name(self) -> str:
        """llama.cpp's ``general.architecture`` string."""
        return gguf.MODEL_ARCH_NAMES[ARCHITECTURES[self.model_type]]


def layout_of(config: Any) -> Layout:
    """The layout of a transformers config; refuses an architecture llama.cpp export does not know here.

    Args:
        config: a ``transformers.PretrainedConfig``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ExportError(f"base model_type {model_type!r}: GGUF export knows {known} (Llama-family) bases only")
    n_head = int(config.num_attention_heads)
    return Layout(
        model_type=model_type,
        n_layers=int(config.num_hidden_layers),
        n_head=n_head,
        n_kv_head=int(getattr(config, "num_key_value_heads", None) or n_head),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def gguf_name(layout: Layout, module: str) -> str | None:
    """llama.cpp's name (without ``.weight``) for a transformers module, or None when it has none.

    Args:
        layout: the base's layout.
        module: a module name such as ``model.layers.3.self_attn.q_proj``.
    """
    return _name_map(layout.model_type, layout.n_layers).get_name(module)


@functools.lru_cache(maxsize=8)
def _name_map(model_type: str, n_layers: int) -> gguf.TensorNameMap:
    """gguf's name table for one architecture and depth, built once (it expands every block's patterns)."""
    return gguf.get_tensor_name_map(ARCHITECTURES[model_type], n_layers)


def heads_of_rows(layout: Layout, name: str) -> int | None:
    """How many heads ``LlamaModel.permute`` groups the rows of tensor ``name`` into (None: not permuted).

    Args:
        layout: the base's layout.
        name: a llama.cpp tensor name without ``.weight``.
    """
    if name.endswith(".attn_q"):
        return layout.n_head
    if name.endswith(".attn_k"):
        return layout.n_kv_head
    return None


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` on the first axis: per head, the two rotary halves interleave.

    Args:
        rows: an array whose first axis is a q or k projection's output.
        n_head: heads of that projection (``n_kv_head`` for k).
    """
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rows` (what transformers' GGUF loader does to q and k).

    Args:
        rows: rows in llama.cpp's order.
        n_head: heads of that projection.
    """
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
