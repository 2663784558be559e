"""The LoRA layer: wraps an existing Linear / Conv1D / Embedding without editing model code.

An adapter's own weights are ``lorakit.lora.weights``; saved full copies (modules_to_save) are
``lorakit.lora.copies``. Both are re-exported here.

h = W0·x + s·B·A·dropout(x), with s = alpha/r (or alpha/sqrt(r) for rsLoRA). A fused QKV projection
(GPT-2's c_attn) can be adapted slice by slice, as in the paper and loralib: each adapted third gets
its own (A, B) pair and only its output columns change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import TargetError
from lorakit.lora.copies import ModuleCopies
from lorakit.lora.kernels import fused_eligible, lora_linear
from lorakit.lora.kinds import AdapterHost, is_conv1d, kind_of
from lorakit.lora.variants import (
    RESIDUAL_INITS,
    base_product,
    dora_extra,
    dora_merged_delta,
    dora_norm,
    dora_unmerged_delta,
    residual_init,
)
from lorakit.lora.weights import WHOLE, AdapterSpec, LoraWeights, layer_kind

__all__ = ["WHOLE", "AdapterSpec", "LoraLayer", "LoraWeights", "ModuleCopies", "is_conv1d", "layer_kind"]


_NO_DROPOUT = nn.Identity()  # serving applies no dropout; one instance, not one per call

class LoraLayer(AdapterHost):
    """A base layer plus any number of named adapters; at most one active (or rows routed per adapter)."""

    ADAPTER_CHILDREN = ("adapters",)
    ADAPTER_LABEL = "LoRA (A, B)"
    TARGETABLE = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.kind = kind_of(base_layer)
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        # Mixed-batch routing, set by lorakit.lora.adapters.route_rows: row → index into routing_names (0 = base).
        self.row_index: Tensor | None = None
        self.routing_names: tuple[str | None, ...] = ()
        self.row_scale: Tensor | None = None  # per-row multiplier of the routed (non-DoRA) delta; None: all 1
        self.row_uniform: int | None = None  # the routing index every row shares, if they all share one
        self._stack_cache: tuple[tuple, Tensor, Tensor, bool] | None = None
        self.row_key: tuple | None = None  # (routing table, row indices) of the current route_rows call
        # Each row's A and B, gathered from the stacks: reused while routing and stacks stay (decode steps).
        self._rows_cache: tuple[tuple, Tensor, Tensor, Tensor, Tensor] | None = None
        self._merged_norm: Tensor | None = None  # DoRA: ‖W0 + ΔW‖ per row at merge time

    # -- shapes and base passthrough -----------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        return self.kind.in_features(self.base_layer.weight)

    @property
    def out_features(self) -> int:
        return self.kind.out_features(self.base_layer.weight)

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        """Add adapter ``name`` (inactive) with freshly initialised weights.

        Args:
            name: the adapter's name (a Python identifier).
            spec: its rank, scaling, dropout, slices and initialisation.

        Raises:
            TargetError: when this layer already has an adapter of that name, or the slices do not fit.
        """
        if name in self.adapters:
            raise TargetError(f"adapter {name!r} is already injected into this layer")
        self._check_variant(spec)
        weights = LoraWeights(self.in_features, self.out_features, spec, self.kind)
        w = self.base_layer.weight
        # LoRA parameters live on the base's device; fp32 unless the base is fp32 anyway (bf16 bases
        # keep fp32 adapters, the precise and usual choice).
        self.adapters[name] = weights.to(device=w.device)
        if spec.init in RESIDUAL_INITS:
            self._init_residual(weights, spec.init)
        if weights.magnitude is not None:
            with torch.no_grad():
                weights.magnitude.copy_(self._dora_norm(weights))
        self._stack_cache = None

    def _check_variant(self, spec: AdapterSpec) -> None:
        residual = spec.init in RESIDUAL_INITS
        if (residual or spec.use_dora) and not self.kind.supports_variants:
            raise TargetError(f"DoRA and PiSSA/OLoRA apply to weight matrices, not to {self.kind.name} layers")
        if (residual and self.adapters) or self.residual_adapter is not None:
            raise TargetError(
                "a PiSSA/OLoRA adapter replaces this layer's weight by a residual, so it must be the layer's only "
                "adapter: delete the other adapter first (or save the residual one: its file is a plain LoRA)"
            )

    @property
    def residual_adapter(self) -> str | None:
        """The PiSSA/OLoRA adapter whose residual the base weight holds, if any."""
        return next((n for n, w in self.adapters.items() if w.residual is not None), None)

    @torch.no_grad()
    def _init_residual(self, weights: LoraWeights, init: str) -> None:
        """A0, B0 from W0 (per slot); W0 becomes ``W0 − s·B0·A0``, so the output is unchanged."""
        w = self.kind.weight_out_in(self.base_layer).float()
        weights.residual = {}
        for key, (start, stop) in weights.spans.items():
            a0, b0 = residual_init(init, w[start:stop], weights.r, weights.scaling)
            weights.A[key].copy_(a0)
            weights.B[key].copy_(b0)
            weights.residual[key] = (a0.clone(), b0.clone())
        self.kind.set_weight(self.base_layer, w - weights.delta_weight(self.out_features, self.in_features))

    def _residual_delta(self, weights: LoraWeights) -> Tensor:
        """s·B0·A0 as (out, in): what the base weight gave to a PiSSA/OLoRA adapter."""
        assert weights.residual is not None
        dw = torch.zeros(self.out_features, self.in_features, device=self.base_layer.weight.device)
        for key, (start, stop) in weights.spans.items():
            a0, b0 = weights.residual[key]
            dw[start:stop] = b0.float() @ a0.float()
        return dw * weights.scaling

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer, unmerging it first if it is merged.

        Args:
            name: an adapter of this layer.
        """
        if self.merged_adapter == name:
            self.unmerge()
        if self.adapters[name].residual is not None:  # give the base weight back its principal part
            given = self._residual_delta(self.adapters[name])
            self.kind.add_to_weight(self.base_layer, self.kind.to_base_layout(given))
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None
        self._stack_cache = None

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.row_index is not None:
            out = self.base_layer(x, *args, **kwargs)
            if self.row_uniform == 0:  # every row is the base model's
                return out
            if self._add_routed_delta_(x, out):
                return out
            delta = self._routed_dora(x, out, self._scaled(x, self._routed_delta(x))).to(out.dtype)
            # Serving (no autograd): accumulate into the fresh base output instead of allocating a sum.
            return out.add_(delta) if not torch.is_grad_enabled() else out + delta
        name = self.active_adapter
        if name is None or name == self.merged_adapter:
            out = self.base_layer(x, *args, **kwargs)
            residual = self.residual_adapter if name is None else None
            return out if residual is None else out + self._residual_term(x, residual).to(out.dtype)
        weights = self.adapters[name]
        if weights.magnitude is not None:
            out = self.base_layer(x, *args, **kwargs)
            return out + self._dora_delta(x, out, weights).to(out.dtype)
        if not args and not kwargs and fused_eligible(self, x, weights):
            # The common case (frozen Linear/Conv1D, no dropout): one fused op, see lorakit.lora.kernels.
            return lora_linear(
                x,
                self.base_layer.weight,
                self.base_layer.bias,
                [weights.A[k] for k in weights.spans],
                [weights.B[k] for k in weights.spans],
                list(weights.spans.values()),
                weights.scaling,
                transposed=self.kind.transposed,
            )
        out = self.base_layer(x, *args, **kwargs)
        x_lora = self.kind.lora_input(x, weights.A[next(iter(weights.A))].dtype)
        return out + weights.delta(x_lora, self.out_features).to(out.dtype)

    def _residual_term(self, x: Tensor, name: str) -> Tensor:
        """s·B0·A0·x: the base's own output when a PiSSA/OLoRA adapter holds part of W0 and is not active."""
        weights = self.adapters[name]
        dw = self._residual_delta(weights)
        return F.linear(x.to(dw.dtype), dw)

    # -- DoRA ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _dora_norm(self, weights: LoraWeights) -> Tensor:
        """‖W0 + s·B·A‖ per row; a constant for autograd (no graph is built for it)."""
        w = self.kind.weight_out_in(self.base_layer)
        return dora_norm(w, weights.delta_weight(self.out_features, self.in_features))

    def _dora_delta(self, x: Tensor, out: Tensor, weights: LoraWeights) -> Tensor:
        """DoRA's term on top of the base output ``out`` (PEFT's: with active dropout, W0 sees dropout(x))."""
        x_lora = x.to(weights.A[next(iter(weights.A))].dtype)
        dropping = self.training and not isinstance(weights.dropout, nn.Identity)
        h = weights.dropout(x_lora) if dropping else x_lora
        if dropping:
            wx = base_product(h, self.kind.weight_out_in(self.base_layer))
        else:
            bias = self.bias
            wx = out.to(h.dtype) - (bias.to(h.dtype) if bias is not None else 0)
        lora = weights.delta(h, self.out_features, drop=False)
        assert weights.magnitude is not None
        return dora_extra(h, wx, lora, weights.magnitude, self._dora_norm(weights))

    def _stacks(self) -> tuple[Tensor, Tensor, bool]:
        """Adapters of the routing table stacked as (n, R, in) and (n, out, R), index 0 the base (0); and whether
        a DoRA adapter is routed (its stacked rows are 0: ``_routed_dora`` adds its rows)."""
        names = self.routing_names
        cache = self._stack_cache
        # Cache key: (names, params, their versions). The params of a table only change through
        # add/delete_adapter (which drop the cache), so a hit needs just one _version sweep.
        # Only without grad: stacks reused under autograd would carry no graph back to A and B.
        if cache is not None and cache[0][0] == names and not torch.is_grad_enabled():
            params = cache[0][1]
            if tuple(p._version for p in params) == cache[0][2]:
                return cache[1], cache[2], cache[3]
        params = tuple(p for name in names if name in self.adapters for p in self.adapters[name].parameters())
        key = (names, params, tuple(p._version for p in params))
        out_features = self.out_features
        adapters = self.adapters
        # DoRA adapters are not a pair of matrices: their rows take their own path (_routed_dora).
        pairs = [
            adapters[name].stacked(out_features) if name in adapters and adapters[name].magnitude is None else None
            for name in names
        ]
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
        dora = any(p is None and name in adapters for p, name in zip(pairs, names))
        if not torch.is_grad_enabled():
            # Stacks built with grad enabled carry the autograd graph of training; never reuse those.
            self._stack_cache = (key, a_stack, b_stack, dora)
        return a_stack, b_stack, dora

    def _row_index(self, x: Tensor) -> Tensor:
        """The routing index, repeated for generate()'s beams / num_return_sequences (contiguous copies)."""
        assert self.row_index is not None
        index = self.row_index
        if x.shape[0] != index.shape[0]:
            if x.shape[0] % index.shape[0]:
                raise ValueError(f"batch of {x.shape[0]} rows does not fit {index.shape[0]} routed rows")
            index = index.repeat_interleave(x.shape[0] // index.shape[0])
        return index

    def _scaled(self, x: Tensor, delta: Tensor) -> Tensor:
        """``delta`` with each row times its ``row_scale`` (repeated for generate()'s beams like the index)."""
        if self.row_scale is None:
            return delta
        scale = self.row_scale
        if x.shape[0] != scale.shape[0]:
            scale = scale.repeat_interleave(x.shape[0] // scale.shape[0])
        return delta * scale.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))

    def _routed_dora(self, x: Tensor, out: Tensor, delta: Tensor) -> Tensor:
        """Rows routed to DoRA adapters, each adapter's rows through the exact single-adapter DoRA path."""
        index = self._row_index(x)
        dora = [(i, self.adapters[n]) for i, n in enumerate(self.routing_names) if n is not None and n in self.adapters]
        for i, weights in dora:
            if weights.magnitude is not None and (rows := index == i).any():
                value = self._dora_delta(x[rows], out[rows], weights).to(delta.dtype)
                delta = delta.index_put((rows,), value)  # out of place: autograd-safe
        return delta

    def _routed_delta(self, x: Tensor) -> Tensor:
        """Each row through its own adapter, out of place (autograd-safe): A·x per row, then Bᵀ."""
        a_stack, b_stack, _ = self._stacks()
        ax, b_t = self._rank_activations(x, a_stack, b_stack, self._row_index(x))
        if b_t.dim() == 2:  # one adapter for the whole batch: a plain product, no gather
            return ax @ b_t
        return torch.bmm(ax.reshape(ax.shape[0], -1, ax.shape[-1]), b_t).view(*ax.shape[:-1], -1)

    def _gathered(self, a_stack: Tensor, b_stack: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(Aᵀ, Bᵀ) of each row, (rows, in, R) and (rows, R, out): a gather, cached without grad for the same
        routing over the same stacks (the stacks are new tensors whenever an adapter's weights change)."""
        key = (self.row_key, index.shape[0])
        cache = self._rows_cache
        if cache is not None and cache[0] == key and cache[1] is a_stack and cache[2] is b_stack:
            return cache[3], cache[4]
        rows = a_stack[index].transpose(1, 2), b_stack[index].transpose(1, 2)
        keep = self.row_key is not None and not torch.is_grad_enabled()
        if keep:  # kept copies in the layout bmm reads fastest, since every decode step reads them again
            rows = rows[0].contiguous(), rows[1].contiguous()
        self._rows_cache = (key, a_stack, b_stack, *rows) if keep else None
        return rows

    def _add_routed_delta_(self, x: Tensor, out: Tensor) -> bool:
        """``out[b] += scale[b]·B[b]·A[b]·x[b]`` in place, one fused multiply-add for the whole batch. False (out
        untouched: the caller adds a computed delta) under autograd, for generate()'s beams (more input rows
        than routed rows), with a DoRA adapter routed, in another dtype, or when ``out`` has no (rows,
        positions, out) view to write through."""
        if torch.is_grad_enabled() or self.row_index is None or x.shape[0] != self.row_index.shape[0]:
            return False
        a_stack, b_stack, dora = self._stacks()
        rows, width = x.shape[0], out.shape[-1]
        if dora or out.dtype != a_stack.dtype:
            return False
        try:
            out3 = out.view(rows, -1, width)
            flat = out3.view(-1, width) if self.row_uniform is not None else None
        except RuntimeError:  # a layout no view reaches
            return False
        ax, b_t = self._rank_activations(x, a_stack, b_stack, self.row_index)
        ax = ax.reshape(rows, -1, ax.shape[-1])
        if self.row_scale is not None:
            ax = ax * self.row_scale.to(ax.dtype).view(-1, 1, 1)
        if flat is not None:
            flat.addmm_(ax.reshape(-1, ax.shape[-1]), b_t)
        else:
            out3.baddbmm_(ax, b_t)
        return True

    def _rank_activations(self, x: Tensor, a_stack: Tensor, b_stack: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(A·x of each row, shaped like the layer's output with R columns; the Bᵀ to finish with: (R, out)
        shared by all rows when they use one adapter, else (rows, R, out)), for rows routed by ``index``."""
        if self.row_uniform is not None:
            a, b = a_stack[self.row_uniform], b_stack[self.row_uniform]
            return self.kind.project_in(self.kind.lora_input(x, a.dtype), a, _NO_DROPOUT), b.t()
        ax = self.kind.routed_project_in(x, index, a_stack)
        if ax is not None:
            return ax, b_stack[index].transpose(1, 2)
        a_t, b_t = self._gathered(a_stack, b_stack, index)
        rows = x.shape[0]
        ax = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(a_t.dtype), a_t)
        return ax.view(*x.shape[:-1], ax.shape[-1]), b_t

    # -- merge ---------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter ``name`` in fp32, in the base weight's own layout."""
        return self.kind.to_base_layout(self.adapters[name].delta_weight(self.out_features, self.in_features))

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name``'s ΔW into the base weight (the layer kind decides how).

        Args:
            name: an adapter of this layer.

        Raises:
            RuntimeError: when another adapter is merged already.
        """
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; unmerge it first")
        self.kind.add_to_weight(self.base_layer, self._merge_delta(name))
        self.merged_adapter = name

    def _merge_delta(self, name: str) -> Tensor:
        """What merging adds to the base weight (its layout): ΔW, or for DoRA ``m/‖·‖ ⊙ (W0 + ΔW) − W0``."""
        weights = self.adapters[name]
        if weights.magnitude is None:
            return self.delta_weight(name)
        w = self.kind.weight_out_in(self.base_layer)
        dw = weights.delta_weight(self.out_features, self.in_features)
        self._merged_norm = dora_norm(w, dw)  # unmerge needs the norm of the unmerged weight
        return self.kind.to_base_layout(dora_merged_delta(w, dw, weights.magnitude, self._merged_norm))

    def _unmerge_delta(self, name: str) -> Tensor:
        weights = self.adapters[name]
        if weights.magnitude is None:
            return self.delta_weight(name)
        merged = self.kind.weight_out_in(self.base_layer)
        dw = weights.delta_weight(self.out_features, self.in_features)
        return self.kind.to_base_layout(dora_unmerged_delta(merged, dw, weights.magnitude, self._merged_norm))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter's ΔW from the base weight again (nothing merged: no-op)."""
        if self.merged_adapter is None:
            return
        self.kind.add_to_weight(self.base_layer, self._unmerge_delta(self.merged_adapter), sign=-1.0)
        self.merged_adapter = None

    def extra_repr(self) -> str:
        parts = [f"{n}: r={a.r}, scaling={a.scaling:g}" + (f", slices={a.slices}" if a.slices else "")
                 for n, a in self.adapters.items()]
        return f"kind={self.kind}, active={self.active_adapter!r}, merged={self.merged_adapter!r}; " + "; ".join(parts)
