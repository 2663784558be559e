"""The LoRA layer: wraps an existing Linear / Conv1D / Embedding without editing model code.

h = W0·x + s·B·A·dropout(x), with s = alpha/r (or alpha/sqrt(r) for rsLoRA). A fused QKV projection
(GPT-2's c_attn) can be adapted slice by slice, as in the paper and loralib: each adapted third gets
its own (A, B) pair and only its output columns change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import TargetError
from lorakit.fast import fused_eligible, lora_linear, routed_delta
from lorakit.targets import FUSED_SLICE_NAMES

WHOLE = "whole"  # key of the single (A, B) pair of an unsliced adapter


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer storing its weight transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TargetError(f"lorakit cannot adapt a {type(module).__name__}")


@dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to build one adapter's weights for one layer."""

    r: int
    scaling: float
    dropout: float = 0.0
    slices: tuple[str, ...] | None = None
    init: str = "gaussian"
    init_std: float = 0.125


class LoraWeights(nn.Module):
    """One adapter's (A, B) pairs for one base layer: one pair, or one per fused slice."""

    def __init__(self, in_features: int, out_features: int, spec: AdapterSpec, kind: str) -> None:
        super().__init__()
        self.r = spec.r
        self.scaling = spec.scaling
        self.kind = kind
        self.slices = spec.slices
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        # Output column ranges each (A, B) pair writes to.
        self.spans: dict[str, tuple[int, int]] = {}
        if spec.slices is None:
            self.spans[WHOLE] = (0, out_features)
        else:
            if out_features % len(FUSED_SLICE_NAMES):
                raise TargetError(f"fused projection has {out_features} outputs, not divisible into q/k/v")
            third = out_features // len(FUSED_SLICE_NAMES)
            for s in spec.slices:
                i = FUSED_SLICE_NAMES.index(s)
                self.spans[s] = (i * third, (i + 1) * third)
        for key, (start, stop) in self.spans.items():
            a = torch.empty(spec.r, in_features)
            if spec.init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default, as PEFT and loralib use
            else:
                nn.init.normal_(a, std=spec.init_std)
            self.A[key] = nn.Parameter(a)
            # B = 0: training starts exactly at the pretrained model.
            self.B[key] = nn.Parameter(torch.zeros(stop - start, spec.r))

    def delta(self, x: Tensor, out_features: int) -> Tensor:
        """s·B·A·dropout(x) for a batch, laid out like the base output."""
        if self.kind == "embedding":
            pieces = {k: F.embedding(x, self.A[k].t()) @ self.B[k].t() for k in self.spans}
        else:
            h = self.dropout(x)
            pieces = {k: (h @ self.A[k].t()) @ self.B[k].t() for k in self.spans}
        if self.slices is None:
            return pieces[WHOLE] * self.scaling
        out = x.new_zeros(*pieces[next(iter(pieces))].shape[:-1], out_features)
        for k, (start, stop) in self.spans.items():
            out[..., start:stop] = pieces[k]
        return out * self.scaling

    def delta_weight(self, out_features: int, in_features: int) -> Tensor:
        """Dense ΔW = s·B·A in fp32, shaped (out, in) whatever the base layout."""
        dw = torch.zeros(out_features, in_features, dtype=torch.float32, device=self.A[next(iter(self.A))].device)
        for k, (start, stop) in self.spans.items():
            dw[start:stop] = self.B[k].float() @ self.A[k].float()
        return dw * self.scaling

    def stacked(self, out_features: int) -> tuple[Tensor, Tensor]:
        """(A_cat (R, in), B_full (out, R)) with scaling folded into B: one matrix pair for any slicing."""
        a_cat = torch.cat([self.A[k] for k in self.spans], dim=0)
        b_full = a_cat.new_zeros(out_features, a_cat.shape[0])
        for i, (k, (start, stop)) in enumerate(self.spans.items()):
            b_full[start:stop, i * self.r : (i + 1) * self.r] = self.B[k]
        return a_cat, b_full * self.scaling


class LoraLayer(nn.Module):
    """A base layer plus any number of named adapters; at most one active (or rows routed per adapter)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.kind = layer_kind(base_layer)
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        # Mixed-batch routing, set by lorakit.adapters.route_rows: row → index into _routing_names (0 = base).
        self.row_index: Tensor | None = None
        self.routing_names: tuple[str | None, ...] = ()
        self._stack_cache: tuple[tuple, Tensor, Tensor] | None = None

    # -- shapes and base passthrough -----------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.kind in ("conv1d", "embedding") else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] if self.kind in ("conv1d", "embedding") else w.shape[0]

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        if name in self.adapters:
            raise TargetError(f"adapter {name!r} is already injected into this layer")
        weights = LoraWeights(self.in_features, self.out_features, spec, self.kind)
        w = self.base_layer.weight
        # LoRA parameters live on the base's device; fp32 unless the base is fp32 anyway (bf16 bases
        # keep fp32 adapters, the precise and usual choice).
        self.adapters[name] = weights.to(device=w.device)
        self._stack_cache = None

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None
        self._stack_cache = None

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.row_index is not None:
            out = self.base_layer(x, *args, **kwargs)
            delta = self._routed_delta(x).to(out.dtype)
            # Serving (no autograd): accumulate into the fresh base output instead of allocating a sum.
            return out.add_(delta) if not torch.is_grad_enabled() else out + delta
        name = self.active_adapter
        if name is None or name == self.merged_adapter:
            return self.base_layer(x, *args, **kwargs)
        weights = self.adapters[name]
        if not args and not kwargs and fused_eligible(self, x, weights):
            # The common case (frozen Linear/Conv1D, no dropout): one fused op, see lorakit.fast.
            return lora_linear(
                x,
                self.base_layer.weight,
                self.base_layer.bias,
                [weights.A[k] for k in weights.spans],
                [weights.B[k] for k in weights.spans],
                list(weights.spans.values()),
                weights.scaling,
                transposed=self.kind == "conv1d",
            )
        out = self.base_layer(x, *args, **kwargs)
        x_lora = x if self.kind == "embedding" else x.to(weights.A[next(iter(weights.A))].dtype)
        return out + weights.delta(x_lora, self.out_features).to(out.dtype)

    def _stacks(self) -> tuple[Tensor, Tensor]:
        """Adapters of the routing table stacked as (n, R, in) and (n, out, R); index 0 is the base (0)."""
        names = self.routing_names
        cache = self._stack_cache
        # Cache key: (names, params, their versions). The params of a table only change through
        # add/delete_adapter (which drop the cache), so a hit needs just one _version sweep.
        # Only without grad: stacks reused under autograd would carry no graph back to A and B.
        if cache is not None and cache[0][0] == names and not torch.is_grad_enabled():
            params = cache[0][1]
            if tuple(p._version for p in params) == cache[0][2]:
                return cache[1], cache[2]
        params = tuple(p for name in names if name in self.adapters for p in self.adapters[name].parameters())
        key = (names, params, tuple(p._version for p in params))
        out_features = self.out_features
        adapters = self.adapters
        pairs = [adapters[name].stacked(out_features) if name in adapters else None for name in names]
        real = [p for p in pairs if p is not None]
        rank = max(a.shape[0] for a, _ in real) if real else 1
        ref = self.base_layer.weight
        dtype = real[0][0].dtype if real else torch.float32
        a_stack = torch.zeros(len(pairs), rank, self.in_features, dtype=dtype, device=ref.device)
        b_stack = torch.zeros(len(pairs), self.out_features, rank, dtype=dtype, device=ref.device)
        for i, pair in enumerate(pairs):
            if pair is not None:
                a, b = pair
                a_stack[i, : a.shape[0]] = a
                b_stack[i, :, : b.shape[1]] = b
        if not torch.is_grad_enabled():
            # Stacks built with grad enabled carry the autograd graph of training; never reuse those.
            self._stack_cache = (key, a_stack, b_stack)
        return a_stack, b_stack

    def _routed_delta(self, x: Tensor) -> Tensor:
        """Each row through its own adapter: one gather and two batched matmuls, no loop over adapters."""
        assert self.row_index is not None
        a_stack, b_stack = self._stacks()
        index = self.row_index
        if x.shape[0] != index.shape[0]:
            # generate() with beams/num_return_sequences repeats each row contiguously.
            if x.shape[0] % index.shape[0]:
                raise ValueError(f"batch of {x.shape[0]} rows does not fit {index.shape[0]} routed rows")
            index = index.repeat_interleave(x.shape[0] // index.shape[0])
        if self.kind == "embedding":
            # ax[b, t] = A_stack[index[b]][:, ids[b, t]]
            ax = a_stack.transpose(1, 2)[index[:, None], x]
            return torch.bmm(ax.flatten(1, -2), b_stack[index].transpose(1, 2)).view(*ax.shape[:-1], -1)
        return routed_delta(x, index, a_stack, b_stack)

    # -- merge ---------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter ``name`` in fp32, in the base weight's own layout."""
        dw = self.adapters[name].delta_weight(self.out_features, self.in_features)
        return dw.t() if self.kind in ("conv1d", "embedding") else dw

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; unmerge it first")
        w = self.base_layer.weight
        # fp32 arithmetic even for bf16/fp16 weights: rounding once instead of in the add.
        w.copy_((w.float() + self.delta_weight(name).to(w.device)).to(w.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight(self.merged_adapter).to(w.device)).to(w.dtype))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        parts = [f"{n}: r={a.r}, scaling={a.scaling:g}" + (f", slices={a.slices}" if a.slices else "")
                 for n, a in self.adapters.items()]
        return f"kind={self.kind}, active={self.active_adapter!r}, merged={self.merged_adapter!r}; " + "; ".join(parts)


class ModuleCopies(nn.Module):
    """A module trained and saved with an adapter (PEFT's modules_to_save), one copy per adapter.

    The original stays untouched so disabling adapters gives the base model back.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.routing_names: tuple[str | None, ...] = ()
        self.row_index: Tensor | None = None

    def add_copy(self, name: str) -> nn.Module:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def current(self) -> nn.Module:
        if self.active_adapter is not None and self.active_adapter in self.copies:
            return self.copies[self.active_adapter]
        return self.original_module

    def route(self, names: tuple[str | None, ...], row_index: Tensor | None) -> None:
        self.routing_names, self.row_index = names, row_index

    def forward(self, *args, **kwargs):
        if self.row_index is None:
            return self.current()(*args, **kwargs)
        # Saved modules are small heads: run each distinct copy once, then pick each row's output.
        outs = torch.stack([
            self.copies[n](*args, **kwargs) if n in self.copies else self.original_module(*args, **kwargs)
            for n in self.routing_names
        ])
        index = self.row_index.to(outs.device)
        if outs.shape[1] != index.shape[0]:
            index = index.repeat_interleave(outs.shape[1] // index.shape[0])
        return outs[index, torch.arange(outs.shape[1], device=outs.device)]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code reads attributes of the wrapped module (e.g. classifier.out_features).
            return getattr(self.current(), name)
