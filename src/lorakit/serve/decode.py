"""One decode step of a Llama causal LM without transformers' per-layer plumbing.

A server's decode step is a batch of sequences advancing one token each: every matrix product is short, and
transformers' layers add about as many small tensor operations again (the 4-D mask, attention dispatch,
keyword plumbing, output classes). This step calls the model's own modules for every product, norm and MLP,
so LoRA routing, DoRA and packed weights apply exactly as in the model's forward, and does only the
attention itself: grouped-query attention over the KV cache in a few operations, with transformers' rotary
embedding and an additive padding mask built once a step. It serves only models whose
blocks are exactly transformers' Llama classes with no hooks: anything else (a baseline wrapping a block, a
hook, another family) decodes through the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from transformers.models.llama import modeling_llama as llama

DecodeStep = Callable[[Tensor, Tensor, Tensor, object], Tensor]


def lean_decoder(model: nn.Module) -> DecodeStep | None:
    """``step(input_ids, position_ids, attention_mask, cache) -> logits (batch, vocab)`` for ``model``, or None
    when its structure is not exactly a Llama causal LM's (the caller then runs the model's forward).

    Args:
        model: the model a server decodes with.
    """
    if type(model) is not llama.LlamaForCausalLM or model.training or _hooked(model):
        return None
    body = model.model
    config = body.config
    if getattr(config, "sliding_window", None) or type(body.norm) is not llama.LlamaRMSNorm or _hooked(body):
        return None
    if not all(_plain_block(block) for block in body.layers[: config.num_hidden_layers]):
        return None
    return partial(decode_step, model)


def _plain_block(block: nn.Module) -> bool:
    parts = (block, block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm)
    kinds = (llama.LlamaDecoderLayer, llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm, llama.LlamaRMSNorm)
    return all(type(part) is kind and not _hooked(part) for part, kind in zip(parts, kinds))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def decode_step(model: nn.Module, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                cache: object) -> Tensor:
    """The next-token logits (batch, vocab) of each row, appending each row's key and value to ``cache``.

    Args:
        model: a Llama causal LM (``lean_decoder`` checked it).
        input_ids: (batch, 1), each row's last token.
        position_ids: (batch, 1), each row's position.
        attention_mask: (batch, cached + 1), 0 on left padding.
        cache: a transformers ``Cache`` holding (batch, kv heads, cached, head dim) per layer.
    """
    body = model.model
    hidden = body.embed_tokens(input_ids)
    rotary = body.rotary_emb(hidden, position_ids)
    bias = torch.zeros(attention_mask.shape, dtype=hidden.dtype).masked_fill_(attention_mask == 0, float("-inf"))
    bias = bias[:, None, None, :]
    for index, block in enumerate(body.layers[: body.config.num_hidden_layers]):
        hidden = hidden + _attention(block.self_attn, block.input_layernorm(hidden), rotary, bias, cache, index)
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    return model.lm_head(body.norm(hidden))[:, -1]


def _attention(attn: nn.Module, x: Tensor, rotary: tuple[Tensor, Tensor], bias: Tensor, cache: object,
               index: int) -> Tensor:
    """Grouped-query attention of one new token per row: the query heads sharing a key head are one matmul."""
    batch, dim = x.shape[0], attn.head_dim
    kv_heads = attn.config.num_key_value_heads
    # (batch, kv heads, query heads per kv head, dim): transformers' rotary broadcasts over the middle two
    queries, keys = llama.apply_rotary_pos_emb(attn.q_proj(x).view(batch, kv_heads, -1, dim),
                                               attn.k_proj(x).view(batch, kv_heads, 1, dim), *rotary)
    keys, values = cache.update(keys, attn.v_proj(x).view(batch, kv_heads, 1, dim), index)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(attn.scaling).add_(bias)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return attn.o_proj(torch.matmul(weights, values).view(batch, 1, -1))
