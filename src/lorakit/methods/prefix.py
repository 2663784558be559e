"""Prefix methods: ``prefix_embed`` (trainable virtual tokens at the input) and ``prefix_layer`` (trainable
key/value prefixes in every attention layer, Li & Liang 2021).

``prefix_layer`` routes each attention module through one extra attention function, registered with
transformers' ``AttentionInterface``, that prepends the layer's trainable keys/values to the real ones and
widens the attention mask by as many always-visible columns before calling the model's own eager/SDPA
kernel. It sees the final keys (after RoPE, after the KV cache), so it is the same code for Llama (GQA),
BERT and GPT-2, leaves position ids alone (unlike a prefix passed as ``past_key_values``, which shifts
every position by the prefix length), works for encoders that have no cache, and keeps the KV cache
holding only real tokens, so ``generate()`` needs nothing special.

``prefix_embed`` inserts ``lp`` virtual tokens before the input (after [CLS] on BERT-style encoders, so the
pooled token stays first) and ``li`` after the prompt: before the first supervised label when token-level
``labels`` are given (training a causal LM) or at ``lorakit_infix_at`` when passed, else after the last
real token (classification, and the generation prompt, which is the same place). Inputs stay token ids:
the virtual slots get a placeholder id and a hook on the input embedding swaps in the trainable vectors,
so models that pool by token id (Llama's sequence classifier) still work. Returned logits are gathered
back to the caller's length: logits[t] is the model's prediction of the token after t (made at the last
virtual token before it when an infix sits there), so the usual shifted loss on the caller's labels
matches the model's own.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.data.collate import IGNORE_INDEX
from lorakit.errors import ConfigError
from lorakit.lora.arch import family_of
from lorakit.methods.finetune import freeze_all, hidden_size, num_layers, unfreeze, unfreeze_head

IMPL = "lorakit_prefix"  # the attention implementation name prefix_layer registers
LAYER_ATTR = "lorakit_prefix"  # child of each attention module holding its key/value prefix
EMBED_ATTR = "lorakit_prefix_embed"  # child of the model holding the virtual-token embeddings
SUPPORTED_KERNELS = ("eager", "sdpa")
INIT_KINDS = ("tokens", "normal")
INFIX_KWARG = "lorakit_infix_at"  # optional forward kwarg: where each row's infix goes (B,) or an int


# -- prefix_layer ----------------------------------------------------------------------------------------


class LayerPrefix(nn.Module):
    """One attention layer's trainable keys and values, shaped (kv_heads, length, head_dim)."""

    def __init__(self, length: int, kv_heads: int, head_dim: int, kernel: str) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.zeros(kv_heads, length, head_dim))
        self.value = nn.Parameter(torch.zeros(kv_heads, length, head_dim))
        self.kernel = kernel  # the model's own attention implementation, called after prepending
        # While not None, the next call records the real keys/values instead of prepending (init="tokens").
        self.recorded: list[tuple[Tensor, Tensor]] | None = None

    @property
    def length(self) -> int:
        return self.key.shape[1]

    def extra_repr(self) -> str:
        kv_heads, length, head_dim = self.key.shape
        return f"length={length}, kv_heads={kv_heads}, head_dim={head_dim}, kernel={self.kernel}"


def _kernel(module: nn.Module, name: str) -> Callable[..., Any]:
    """The attention function the model would have called: its module's eager one, or a registered one."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def extend_mask(
    mask: Tensor | None,
    q_len: int,
    kv_len: int,
    prefix_len: int,
    causal: bool,
    kernel: str,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The attention mask for [prefix; real keys]: the prefix is visible to every query.

    Keeps the mask's own format (bool: True = attend; float: additive 0 / -inf-ish). A missing mask means
    "all visible" or, for causal attention with several queries, "causal": that case must become explicit,
    since the kernel's implicit causal mask would hide the prefix instead.
    """
    if mask is None:
        if not causal or q_len == 1:
            return None
        # Bottom-right aligned: query i sits at kv position kv_len - q_len + i (a cache may precede it).
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        allowed = torch.arange(kv_len, device=device)[None, :] <= rows
        mask = allowed[None, None]
        if kernel == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    if mask.dim() != 4:
        raise ConfigError(f"prefix_layer expects a 4-D attention mask, got shape {tuple(mask.shape)}")
    if mask.shape[-1] != kv_len:
        mask = mask[..., :kv_len]  # masks built for a static cache can be longer than the keys
    pad_shape = (*mask.shape[:-1], prefix_len)
    pad = torch.ones(pad_shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool else (
        torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device))
    return torch.cat([pad, mask], dim=-1)


def prefix_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """Attention with the layer's trainable prefix prepended to keys and values (registered as IMPL)."""
    prefix: LayerPrefix = getattr(module, LAYER_ATTR)
    kernel = _kernel(module, prefix.kernel)
    if prefix.recorded is not None:
        prefix.recorded.append((key.detach(), value.detach()))
        return kernel(module, query, key, value, attention_mask, **kwargs)
    batch, kv_len = key.shape[0], key.shape[2]
    pk = prefix.key.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
    pv = prefix.value.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    mask = extend_mask(attention_mask, query.shape[2], kv_len, prefix.length, bool(causal), prefix.kernel,
                       query.dtype, query.device)
    return kernel(module, query, torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), mask, **kwargs)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL, prefix_attention)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules that call transformers' attention interface (one per block)."""
    found = [
        (name, m) for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and "Cross" not in type(m).__name__
        and hasattr(m, "config") and hasattr(m, "layer_idx") and not getattr(m, "is_cross_attention", False)
    ]
    if len(found) != num_layers(model):
        raise ConfigError(
            f"prefix_layer: expected one self-attention module per block ({num_layers(model)}) in "
            f"{type(model).__name__}, found {len(found)}: {[n for n, _ in found][:4]}..."
        )
    return found


def _kv_shape(module: nn.Module) -> tuple[int, int]:
    cfg = module.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    return int(kv_heads), int(head_dim or cfg.hidden_size // heads)


@torch.no_grad()
def _record_real_kv(model: nn.Module, prefixes: list[LayerPrefix], length: int) -> list[tuple[Tensor, ...]]:
    """Each layer's keys/values for ``length`` random vocabulary tokens (Li & Liang's real-word init)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, length), device=device)
    was_training = model.training
    model.eval()
    for p in prefixes:
        p.recorded = []
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return [p.recorded[0] for p in prefixes]  # type: ignore[index]
    finally:
        for p in prefixes:
            p.recorded = None
        model.train(was_training)


def apply_prefix_layer(
    model: nn.Module, length: int = 10, init: str = "tokens", init_std: float = 0.02, train_head: bool = True
) -> None:
    """Trainable ``length`` keys/values prepended in every attention layer; all else frozen but the head."""
    if not isinstance(length, int) or length < 1:
        raise ConfigError(f"prefix_layer: length must be a positive integer, got {length!r}")
    if init not in INIT_KINDS:
        raise ConfigError(f"prefix_layer: init must be one of {list(INIT_KINDS)}, got {init!r}")
    kernel = getattr(model.config, "_attn_implementation", None) or "eager"
    if kernel not in SUPPORTED_KERNELS:
        raise ConfigError(
            f"prefix_layer works with the {list(SUPPORTED_KERNELS)} attention implementations, this model "
            f"uses {kernel!r}: load it with attn_implementation='sdpa'"
        )
    modules = attention_modules(model)
    _register()
    freeze_all(model)
    prefixes = []
    for _, attn in modules:
        kv_heads, head_dim = _kv_shape(attn)
        ref = next(attn.parameters())
        prefix = LayerPrefix(length, kv_heads, head_dim, kernel).to(device=ref.device)
        setattr(attn, LAYER_ATTR, prefix)
        # Each attention module reads its kernel from its config; a private copy routes only attention
        # through the prefix while the model-level mask code keeps seeing the real implementation.
        own = copy.copy(attn.config)
        own._attn_implementation_internal = IMPL
        attn.config = own
        prefixes.append(prefix)
    if init == "tokens":
        for prefix, (k, v) in zip(prefixes, _record_real_kv(model, prefixes, length)):
            prefix.key.data.copy_(k[0].float())
            prefix.value.data.copy_(v[0].float())
    elif init == "normal":
        for prefix in prefixes:
            nn.init.normal_(prefix.key, std=init_std)
            nn.init.normal_(prefix.value, std=init_std)
    for prefix in prefixes:
        unfreeze(prefix)
    unfreeze_head(model, train_head)


# -- prefix_embed ----------------------------------------------------------------------------------------


class PrefixEmbedding(nn.Module):
    """``lp`` prefix and ``li`` infix virtual-token embeddings, and the per-call slot bookkeeping."""

    def __init__(
        self, lp: int, li: int, dim: int, placeholder_id: int, after_first: bool, max_positions: int | None
    ) -> None:
        super().__init__()
        self.lp, self.li = lp, li
        self.table = nn.Parameter(torch.zeros(lp + li, dim))  # rows [0, lp): prefix; [lp, lp+li): infix
        self.placeholder_id = placeholder_id
        self.after_first = after_first
        self.max_positions = max_positions  # absolute position tables (BERT, GPT-2) cap the widened length
        self.slots: Tensor | None = None  # (B, N) virtual-token index per position, -1 for real tokens
        self.out_index: Tensor | None = None  # (B, T) where each caller position's logits come from

    @property
    def count(self) -> int:
        return self.lp + self.li

    def extra_repr(self) -> str:
        return f"lp={self.lp}, li={self.li}, dim={self.table.shape[1]}, after_first={self.after_first}"


def _first_true(x: Tensor) -> Tensor:
    return x.int().argmax(dim=1)


def _plan(
    pe: PrefixEmbedding, real: Tensor, labels: Tensor | None, infix_at: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dest (B, T): new position of each token, slots (B, N), out_index (B, T)) for one batch."""
    batch, t_len = real.shape
    device = real.device
    end = t_len - _first_true(real.flip(1))  # one past the last real token (left or right padding)
    start = torch.minimum(_first_true(real) + int(pe.after_first), end)
    infix = end
    if infix_at is not None:
        infix = torch.minimum(torch.as_tensor(infix_at, device=device).expand(batch), end)
    elif labels is not None and labels.dim() == 2 and labels.shape == real.shape:
        supervised = labels != IGNORE_INDEX
        infix = torch.where(supervised.any(1), _first_true(supervised), end)
    infix = torch.maximum(infix, start)
    t = torch.arange(t_len, device=device)[None]
    dest = t + pe.lp * (t >= start[:, None]) + pe.li * (t >= infix[:, None])
    n_new = t_len + pe.count
    slots = torch.full((batch, n_new), -1, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    if pe.lp:
        slots[rows, start[:, None] + torch.arange(pe.lp, device=device)] = torch.arange(pe.lp, device=device)
    if pe.li:
        slots[rows, infix[:, None] + pe.lp + torch.arange(pe.li, device=device)] = pe.lp + torch.arange(
            pe.li, device=device)
    # The logits predicting token t+1 are those at the position just before t+1 lands (an infix's last token).
    following = torch.cat([dest[:, 1:], torch.full((batch, 1), n_new, device=device)], dim=1)
    return dest, slots, following - 1


def _spread(x: Tensor, dest: Tensor, n_new: int, fill: Any) -> Tensor:
    """Place x's (B, T, ...) entries at ``dest`` in a (B, N, ...) tensor filled with ``fill``."""
    out = torch.full((x.shape[0], n_new, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    index = dest.view(*dest.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter(1, index, x)


def _insert_virtual(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook on the model: widen the inputs by the virtual tokens (the mask, on decode steps)."""
    pe: PrefixEmbedding = getattr(model, EMBED_ATTR)
    pe.slots = pe.out_index = None
    kwargs = dict(kwargs)
    infix_at = kwargs.pop(INFIX_KWARG, None)  # ours alone: the model must never see it
    if args:
        if "input_ids" in kwargs or len(args) > 1:
            raise ConfigError("prefix_embed: pass inputs by keyword (input_ids=..., attention_mask=...)")
        kwargs = {**kwargs, "input_ids": args[0]}
    ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return (), kwargs
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ConfigError("prefix_embed needs a 2-D attention_mask (batch, tokens)")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        return (), _count_cached_virtual(pe, kwargs, mask)
    return (), _widen_inputs(pe, kwargs, ref, mask, infix_at)


def _count_cached_virtual(pe: PrefixEmbedding, kwargs: dict[str, Any], mask: Tensor | None) -> dict[str, Any]:
    """A decode step: the virtual tokens are in the cache already; the mask and positions must count them."""
    if mask is not None:
        # Any place inside the real span will do: the mask is all ones there.
        t = torch.arange(mask.shape[1], device=mask.device)[None]
        dest = t + pe.count * (t >= _first_true(mask.bool())[:, None])
        kwargs["attention_mask"] = _spread(mask, dest, mask.shape[1] + pe.count, 1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + pe.count
    return kwargs


def _widen_inputs(pe: PrefixEmbedding, kwargs: dict[str, Any], ref: Tensor, mask: Tensor | None,
                  infix_at: Any) -> dict[str, Any]:
    """A full pass: the ids (or embeddings) gain the virtual tokens, and every per-token input with them."""
    batch, t_len = ref.shape[:2]
    n_new = t_len + pe.count
    if pe.max_positions is not None and n_new > pe.max_positions:
        raise ConfigError(f"prefix_embed: {t_len} tokens + {pe.count} virtual tokens exceed the model's "
                          f"{pe.max_positions} positions; shorten the inputs (max_length)")
    real = mask.bool() if mask is not None else torch.ones(batch, t_len, dtype=torch.bool, device=ref.device)
    labels = kwargs.get("labels")
    dest, slots, out_index = _plan(pe, real, labels, infix_at)
    pe.slots, pe.out_index = slots, out_index
    if kwargs.get("input_ids") is not None:
        kwargs["input_ids"] = _spread(kwargs["input_ids"], dest, n_new, pe.placeholder_id)
    else:
        embeds = kwargs["inputs_embeds"]
        table = pe.table.to(embeds.dtype)[slots.clamp(min=0)]
        kwargs["inputs_embeds"] = torch.where((slots >= 0)[..., None], table, _spread(embeds, dest, n_new, 0))
        pe.slots = None  # already filled in; the embedding hook must not run on these
    new_mask = _spread(real.to(mask.dtype if mask is not None else torch.long), dest, n_new, 1)
    if mask is not None:
        kwargs["attention_mask"] = new_mask
    if labels is not None and labels.dim() == 2 and labels.shape == (batch, t_len):
        kwargs["labels"] = _spread(labels, dest, n_new, IGNORE_INDEX)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = _widened_segments(kwargs["token_type_ids"].expand(batch, -1), dest, slots)
    if kwargs.get("position_ids") is not None:
        # Generation passes positions counted over the mask; recount them over the widened mask.
        kwargs["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
    return kwargs


def _widened_segments(token_type_ids: Tensor, dest: Tensor, slots: Tensor) -> Tensor:
    """A virtual token takes the segment of the token to its left (segment 0 at the very start)."""
    n_new = slots.shape[1]
    tt = _spread(token_type_ids, dest, n_new, 0)
    left = torch.where(slots < 0, torch.arange(n_new, device=tt.device)[None], -1).cummax(dim=1).values
    return tt.gather(1, left.clamp(min=0))


def _fill_virtual(pe: PrefixEmbedding, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook on the input embedding: the placeholder slots get the trainable vectors."""
    slots = pe.slots
    if slots is None or output.shape[:2] != slots.shape:
        return output
    pe.slots = None  # consumed: a second embedding call in the same forward must not refill
    virtual = (slots >= 0)[..., None]
    return torch.where(virtual, pe.table.to(output.dtype)[slots.clamp(min=0)], output)


def _gather_logits(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook on the model: logits back at the caller's positions (see the module docstring)."""
    pe: PrefixEmbedding = getattr(model, EMBED_ATTR)
    index, pe.out_index, pe.slots = pe.out_index, None, None
    logits = getattr(output, "logits", None)
    if index is None or logits is None or logits.dim() != 3 or logits.shape[1] != index.shape[1] + pe.count:
        return output
    output.logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
    return output


def needs_labels(model: nn.Module) -> bool:
    """Whether a training forward must tell the model where prompts end, by passing token-level ``labels``
    or ``lorakit_infix_at`` (prefix_embed puts its infix right before the first supervised token)."""
    model = getattr(model, "module", model)  # DDP / FSDP wrappers
    pe = getattr(model, EMBED_ATTR, None)
    return isinstance(pe, PrefixEmbedding) and pe.li > 0


def _absolute_positions(model: nn.Module) -> int | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in ("position_embeddings", "wpe"):
            return module.num_embeddings
    return None


def _is_cls_encoder(model: nn.Module) -> bool:
    """BERT-style encoders pool their first token: keep it first."""
    family = family_of(model)
    if family is not None and family.pools_first_token:
        return True
    return any(n.endswith("pooler") for n, _ in model.named_modules())


def apply_prefix_embed(
    model: nn.Module, lp: int = 10, li: int = 10, init: str = "tokens", train_head: bool = True
) -> None:
    """Trainable virtual tokens: ``lp`` before the input, ``li`` after the prompt; all else frozen."""
    for name, value in (("lp", lp), ("li", li)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"prefix_embed: {name} must be a non-negative integer, got {value!r}")
    if lp + li == 0:
        raise ConfigError("prefix_embed: lp + li must be at least 1 (there would be nothing to train)")
    if init not in INIT_KINDS:
        raise ConfigError(f"prefix_embed: init must be one of {list(INIT_KINDS)}, got {init!r}")
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    pad = getattr(model.config, "pad_token_id", None)
    placeholder = 1 if pad == 0 else 0  # any non-pad id: its embedding is replaced anyway
    pe = PrefixEmbedding(
        lp, li, hidden_size(model), placeholder, _is_cls_encoder(model), _absolute_positions(model)
    ).to(weight.device)
    with torch.no_grad():
        if init == "tokens":
            # Start from embeddings of random real tokens (Lester et al.'s vocabulary init): in-distribution.
            rows = torch.randint(0, weight.shape[0], (pe.count,), device=weight.device)
            pe.table.copy_(weight[rows].float())
        else:
            nn.init.normal_(pe.table, std=float(weight.float().std()))
    freeze_all(model)
    setattr(model, EMBED_ATTR, pe)
    model.register_forward_pre_hook(_insert_virtual, with_kwargs=True)
    model.register_forward_hook(_gather_logits, with_kwargs=True)
    embedding.register_forward_hook(functools.partial(_fill_virtual, pe))
    unfreeze(pe)
    unfreeze_head(model, train_head)
