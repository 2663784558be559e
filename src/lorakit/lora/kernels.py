"""Fast paths for training and serving LoRA models, each equal to the plain formula (see tests/lora/test_kernels.py).

* ``lora_linear``: one autograd Function for ``W0·x (+b) + s·B·(A·x)`` on a frozen Linear / Conv1D base,
  whole or per fused slice. Forward accumulates the low-rank term into the base output in place; backward
  uses only ``x`` and ``A·x`` (no W0 weight gradient, no dropout copy, no full-width LoRA temporaries).
* ``causal_lm_loss``: the causal-LM loss with the LM head applied only at positions that have a label,
  through ``linear_cross_entropy`` (chunked head + loss, gradients formed in forward, no logits kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # label value torch's cross-entropy skips; the collators import it from here


# -- fused LoRA linear ---------------------------------------------------------------------------------
def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a matmul in on this device, or None when autocast is off."""
    if device_type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class _LoraLinear(torch.autograd.Function):
    """``out = base(x) + s·Σ_k B_k·(A_k·x)`` written into output columns ``spans[k]``.

    Names: ``*_rows`` are inputs flattened to (N, features); ``*_base`` / ``*_lora`` are cast to the base's
    and the adapter's compute dtype; ``ax`` is A·x, the rank-r activations. Dtypes are decided by the caller
    and everything runs with autocast off, so forward and backward use the same precision whatever context
    ``backward()`` is called in.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        transposed: bool,
        spans: tuple[tuple[int, int], ...],
        scaling: float,
        base_dtype: torch.dtype,
        lora_dtype: torch.dtype,
        *ab: Tensor,
    ) -> Tensor:
        n = len(spans)
        a_list, b_list = ab[:n], ab[n:]
        x_rows = x.reshape(-1, x.shape[-1])
        w = weight.to(base_dtype)
        bias_base = None if bias is None else bias.to(base_dtype)
        x_base = x_rows.to(base_dtype)
        if transposed:  # transformers Conv1D keeps W as (in, out)
            out = torch.mm(x_base, w) if bias_base is None else torch.addmm(bias_base, x_base, w)
        else:
            out = F.linear(x_base, w, bias_base)
        x_lora = x_rows.to(lora_dtype)
        a_cat = torch.cat([a.to(lora_dtype) for a in a_list], 0) if n > 1 else a_list[0].to(lora_dtype)
        ax = x_lora @ a_cat.t()  # (N, n·r): the only activation LoRA adds to the saved state
        r = a_list[0].shape[0]
        for k, (start, stop) in enumerate(spans):
            ax_k = ax[:, k * r : (k + 1) * r]
            bk = b_list[k].to(lora_dtype)
            target = out if (start, stop) == (0, out.shape[1]) else out[:, start:stop]
            if out.dtype == lora_dtype:
                target.addmm_(ax_k, bk.t(), alpha=scaling)  # in place: no full-width temporary
            else:
                target.add_((ax_k @ bk.t()).mul_(scaling).to(out.dtype))
        ctx.save_for_backward(x_lora, ax, weight, *a_list, *b_list)
        bias_dtype = None if bias is None else bias.dtype
        ctx.meta = (transposed, spans, scaling, base_dtype, lora_dtype, x.shape, x.dtype, bias_dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x_lora, ax, weight, *ab = ctx.saved_tensors
        transposed, spans, scaling, base_dtype, lora_dtype, x_shape, x_dtype, bias_dtype = ctx.meta
        n = len(spans)
        a_list, b_list = ab[:n], ab[n:]
        r = a_list[0].shape[0]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_lora = grad_rows.to(lora_dtype)
        grad_a: list[Tensor | None] = [None] * n
        grad_b: list[Tensor | None] = [None] * n
        grad_ax_parts = []
        for k, (start, stop) in enumerate(spans):
            g_k = grad_lora if (start, stop) == (0, grad_rows.shape[1]) else grad_lora[:, start:stop]
            if ctx.needs_input_grad[8 + n + k]:
                grad_b[k] = (g_k.t() @ ax[:, k * r : (k + 1) * r]).mul_(scaling).to(b_list[k].dtype)
            grad_ax_parts.append(g_k @ b_list[k].to(lora_dtype))
        grad_ax = (torch.cat(grad_ax_parts, 1) if n > 1 else grad_ax_parts[0]).mul_(scaling)
        if any(ctx.needs_input_grad[8 : 8 + n]):
            grad_a_cat = grad_ax.t() @ x_lora
            for k in range(n):
                grad_a[k] = grad_a_cat[k * r : (k + 1) * r].to(a_list[k].dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.to(base_dtype)
            grad_x = grad_rows.to(base_dtype) @ (w.t() if transposed else w)
            a_cat = torch.cat([a.to(lora_dtype) for a in a_list], 0) if n > 1 else a_list[0].to(lora_dtype)
            if grad_x.dtype == lora_dtype:
                grad_x.addmm_(grad_ax, a_cat)
            else:
                grad_x = grad_x.to(lora_dtype).addmm_(grad_ax, a_cat)
            grad_x = grad_x.to(x_dtype).view(x_shape)
        grad_bias = None
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0, dtype=torch.float32).to(bias_dtype)
        return (grad_x, None, grad_bias, None, None, None, None, None, *grad_a, *grad_b)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a_list: Sequence[Tensor],
    b_list: Sequence[Tensor],
    spans: Sequence[tuple[int, int]],
    scaling: float,
    *,
    transposed: bool = False,
) -> Tensor:
    """``base(x) + s·B·A·x`` with a frozen base weight, one fused op (``spans``: output columns per pair).

    Precision follows what the unfused code does: under autocast both products run in the autocast dtype;
    otherwise the base runs in the weight's dtype and the LoRA term in A's dtype (fp32 adapters on a bf16
    base), added to the base output in its dtype. The bias may be trainable; ``weight`` must not be.
    """
    cast = _autocast_dtype(x.device.type)
    base_dtype = cast or weight.dtype
    lora_dtype = cast or a_list[0].dtype
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(
            x, weight, bias, transposed, tuple(spans), float(scaling), base_dtype, lora_dtype,
            *a_list, *b_list,
        )


def fused_eligible(layer: nn.Module, x: Tensor, weights: nn.Module) -> bool:
    """Whether ``LoraLayer.forward`` may use ``lora_linear``: a plain frozen Linear / Conv1D base, no dropout,
    equal ranks, and an input the base layer itself would accept (so errors stay the base layer's)."""
    base = layer.base_layer
    if not layer.kind.fast_path(base):  # the layer kind decides (lorakit.lora.kinds)
        return False
    if base.weight.requires_grad or not isinstance(weights.dropout, nn.Identity):
        return False
    if base._forward_hooks or base._forward_pre_hooks:
        return False
    if not (x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == layer.in_features):
        return False
    # Mixed dtypes without autocast: let the base layer raise its own error.
    return x.dtype == base.weight.dtype or _autocast_dtype(x.device.type) is not None


# -- loss only where labels are ------------------------------------------------------------------------
def _backbone(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


def compile_for_training(model: nn.Module) -> nn.Module:
    """Compile ``model``'s backbone (the transformer blocks) in place with ``torch.compile`` and return it.

    In place (``nn.Module.compile``), so parameter names, adapters and saved files are unchanged. Inductor
    fuses the norms, activations and rotary embeddings around the matmuls and, in backward, recomputes those
    cheap element-wise results instead of keeping them: fewer passes over memory and about a third less
    activation memory (``docs/records/performance.md``). The head stays eager so ``causal_lm_loss`` still
    computes logits only where labels are. Compiling costs minutes once; run generation and evaluation under
    ``torch.compiler.set_stance("force_eager")``, whose changing shapes would otherwise recompile.
    """
    target = _backbone(model) or model
    target.compile()
    return target


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h·Wᵀ (+b)`` against ``targets``, chunk by chunk, with gradients computed in
    forward (the loss is a scalar, so backward only rescales them): the (rows, vocab) logits never exist
    whole, and nothing vocabulary-sized is kept for backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int, dtype: torch.dtype
    ) -> Tensor:
        rows = h.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, rows, chunk):
            hc = h[start : start + chunk].to(dtype)
            tc = targets[start : start + chunk]
            logits = F.linear(hc, w, b).float()  # as transformers: the head in `dtype`, the loss in fp32
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if want_h or want_w or want_b:
                # d(sum of losses)/d(logits) = softmax - onehot; the 1/rows of the mean comes in backward.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                p = probs.to(dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk] = (p @ w).to(h.dtype)
                if grad_w is not None:
                    grad_w.addmm_(p.t().float(), hc.float())
                if grad_b is not None:
                    grad_b += probs.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.layout = (grad_h is not None, grad_w is not None, grad_b is not None, rows, weight.dtype)
        return total / rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        has_h, has_w, has_b, rows, w_dtype = ctx.layout
        saved = iter(ctx.saved_tensors)
        scale = grad / rows
        grad_h = next(saved) * scale.to(torch.float32) if has_h else None
        grad_w = (next(saved) * scale).to(w_dtype) if has_w else None
        grad_b = (next(saved) * scale).to(w_dtype) if has_b else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(
    h: Tensor, head: nn.Linear, targets: Tensor, *, chunk_elements: int = 1 << 22
) -> Tensor:
    """``F.cross_entropy(head(h).float(), targets)`` (mean) without materialising all logits at once.

    Chunks hold about ``chunk_elements`` logits (16 MiB in fp32). Under autocast the head runs in the
    autocast dtype and the softmax in fp32, exactly as the unfused code does.
    """
    dtype = _autocast_dtype(h.device.type) or head.weight.dtype
    chunk = max(1, chunk_elements // head.weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, head.weight, head.bias, targets, chunk, dtype)


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    **kwargs,
) -> Tensor:
    """Mean next-token cross-entropy, equal to ``model(..., labels=labels).loss``, with the LM head and the
    softmax computed only at positions whose next token has a label (prompt and padding tokens cost no
    vocabulary-sized logits), in chunks, with no logits kept for backward. Models whose head does more
    than a projection fall back to ``model``'s own loss.
    """
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = _backbone(model)
    special = any(getattr(config, a, None) for a in ("final_logit_softcapping", "logit_scale", "output_mult"))
    if backbone is None or head is None or special or getattr(config, "is_encoder_decoder", False):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, **kwargs).loss
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)[0]
    # Position t predicts token t+1: the same shift as transformers' ForCausalLMLoss.
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    selected = hidden[:, :-1][keep]
    if type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks:
        return linear_cross_entropy(selected, head, targets[keep])
    # Wrapped heads (a LoRA layer, modules_to_save copies) keep their own forward.
    return F.cross_entropy(head(selected).float(), targets[keep])
