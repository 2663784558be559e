"""The tests' one tiny-model factory: random 2-layer models of the three architecture families, in memory
(``tiny_bert``, ``tiny_gpt2``, ``tiny_llama``) or saved with a real tokenizer (``make_tiny_bert``,
``make_tiny_llama``, for the trainer and the CLI). Every tiny BERT and Llama takes its sizes from
``bert_config`` / ``llama_config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def bert_config(**overrides: Any) -> BertConfig:
    """A 2-layer, 32-wide BERT config; ``overrides`` set the vocabulary, positions, labels, dropout."""
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertConfig(**{**sizes, **overrides})


def llama_config(**overrides: Any) -> LlamaConfig:
    """A 2-layer, 32-wide Llama config (4 heads, 2 KV heads); ``overrides`` set vocabulary and token ids."""
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip
    return LlamaConfig(**{**sizes, **overrides})


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = llama_config(vocab_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = bert_config(vocab_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def randomize_lora(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every trainable parameter random values, as if trained (B starts at zero otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def ids(batch: int = 3, seq: int = 7, vocab: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def make_tiny_bert(path: Path, dropout: float = 0.0) -> Path:
    """A tiny random BERT with the real MiniLM tokenizer, saved like MiniLM: no task head.

    Args:
        path: the folder (reused when it already holds a model).
        dropout: the hidden and attention dropout of its config.
    """
    from transformers import AutoTokenizer, BertModel

    from lorakit.io.models import model_path

    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    torch.manual_seed(0)
    cfg = bert_config(vocab_size=tok.vocab_size, max_position_embeddings=128, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)  # fmt: skip
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_llama(path: Path) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved (the E2E / causal-LM path).

    Args:
        path: the folder (reused when it already holds a model).
    """
    from transformers import AutoTokenizer

    from lorakit.io.models import model_path

    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = llama_config(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
