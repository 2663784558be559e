"""Quantized frozen base (QLoRA): NF4 or int8 weight-only linear layers with full-precision LoRA on top.

The kernels are bitsandbytes' (its CPU backend; see ``docs/records/quantization.md`` for why not torchao).
A :class:`QuantizedLinear` stores the packed weight as buffers and dequantizes it in forward and again in
backward, so no dense copy of the base weight outlives a matmul (the QLoRA recipe). Its ``weight`` is a
read-only :class:`QuantizedWeight`: shapes, device and dtype are the dense layer's, any read dequantizes,
any write raises. Merging keeps W0 + ΔW in fp32 beside the untouched packed bits; unmerging drops it, so
the quantized base comes back bit for bit (merges are never rounded into 4/8 bits).
"""

from __future__ import annotations

import fnmatch
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lorakit.errors import ConfigError, MergeError, TargetError
from lorakit.lora.arch import POOLER_NAME, TASK_HEAD_NAMES
from lorakit.lora.kinds import AdapterHost, LayerKind, kind_of, register_kind
from lorakit.quant.heap import trim_heap

NF4_BLOCKSIZE = 64  # QLoRA's block size: one fp32 absmax per 64 weights (4.5 bits a weight in all)


def _bnb_functional() -> Any:
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:  # an optional extra
        raise ConfigError("quantization needs bitsandbytes: pip install 'lorakit[quant]'") from exc
    return bnb_f


# -- schemes ---------------------------------------------------------------------------------------------
class Scheme:
    """One weight-only quantization scheme: dense fp32 (out, in) ⇄ named packed tensors."""

    name: ClassVar[str]
    bits: ClassVar[float]  # storage bits per weight, statistics included

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        """The packed tensors of an fp32 (out, in) weight."""
        raise NotImplementedError

    def dequantize(self, packed: dict[str, Tensor], shape: torch.Size) -> Tensor:
        """The fp32 (out, in) weight the packed tensors stand for."""
        raise NotImplementedError


class NF4Scheme(Scheme):
    """4-bit NormalFloat (Dettmers et al., 2023), blockwise absmax; no double quantization."""

    name = "nf4"
    bits = 4 + 32 / NF4_BLOCKSIZE

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        data, state = _bnb_functional().quantize_4bit(
            weight.float().contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=False
        )
        return {"qdata": data, "absmax": state.absmax, "code": state.code}

    def dequantize(self, packed: dict[str, Tensor], shape: torch.Size) -> Tensor:
        bnb_f = _bnb_functional()
        state = bnb_f.QuantState(
            absmax=packed["absmax"], shape=shape, code=packed["code"], blocksize=NF4_BLOCKSIZE,
            quant_type="nf4", dtype=torch.float32,
        )
        return bnb_f.dequantize_4bit(packed["qdata"], state)


class Int8Scheme(Scheme):
    """int8 weight-only, symmetric per output row: W ≈ q · absmax_row / 127 (activations stay fp32)."""

    name = "int8"
    bits = 8.0  # + one fp32 scale per row

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        data, row_absmax, _ = _bnb_functional().int8_vectorwise_quant(weight.float().contiguous())
        return {"qdata": data, "absmax": row_absmax}

    def dequantize(self, packed: dict[str, Tensor], shape: torch.Size) -> Tensor:
        return _bnb_functional().int8_vectorwise_dequant(packed["qdata"], packed["absmax"]).view(shape)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (NF4Scheme(), Int8Scheme())}


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name``.

    Args:
        name: ``"nf4"`` or ``"int8"``.

    Raises:
        ConfigError: for an unknown name.
    """
    if name not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {name!r}; choose from {sorted(SCHEMES)}")
    return SCHEMES[name]


# -- the read-only weight ----------------------------------------------------------------------------------
class QuantizedWeight(Tensor):
    """A dense-looking (out, in) fp32 view of a quantized weight: reads dequantize, writes raise.

    It lets code that inspects ``base_layer.weight`` (shapes, device, norms, finiteness checks) work
    unchanged, while nothing can round a merge into the packed bits by accident.
    """

    @staticmethod
    def __new__(cls, owner: QuantizedLinear) -> QuantizedWeight:
        return Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, owner.weight_shape, dtype=torch.float32, device=owner.qdata.device, requires_grad=False
        )

    def __init__(self, owner: QuantizedLinear) -> None:
        self._dense = owner.dense_weight

    def __repr__(self) -> str:  # never materialise just to print
        return f"QuantizedWeight(shape={tuple(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return args[0]
        if func._schema.is_mutable:
            raise MergeError(
                f"{func.__name__} on a quantized base weight: it is read-only; merge adapters with "
                "lorakit.merge (kept in fp32 beside the packed bits)"
            )
        unwrap = lambda t: t._dense() if isinstance(t, QuantizedWeight) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))

    __torch_function__ = torch._C._disabled_torch_function_impl


# -- the layer ---------------------------------------------------------------------------------------------
class _DequantLinear(torch.autograd.Function):
    """``x·Wᵀ + b`` with W dequantized on the fly in forward and in backward (nothing dense is saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dense_weight().to(x.dtype), bias.to(x.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        return grad_out @ ctx.layer.dense_weight().to(grad_out.dtype), None, None


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` stored NF4 / int8; LoRA wraps it like any linear base (see QuantizedLinearKind).

    Args:
        linear: the layer to quantize (its weight is read, not kept).
        scheme: a scheme name from :data:`SCHEMES`.
    """

    def __init__(self, linear: nn.Linear, scheme: str) -> None:
        super().__init__()
        self.scheme = get_scheme(scheme)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_shape = torch.Size((linear.out_features, linear.in_features))
        with torch.no_grad():
            self._packed_names = []
            for key, tensor in self.scheme.quantize(linear.weight.detach()).items():
                self.register_buffer(key, tensor)
                self._packed_names.append(key)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # W0 + ΔW in fp32 while an adapter is merged; None otherwise (see merge_delta). A buffer so it
        # follows .to(device), not persistent: a state dict always holds the quantized base alone.
        self.merged_weight: Tensor | None
        self.register_buffer("merged_weight", None, persistent=False)

    @property
    def weight(self) -> QuantizedWeight:
        """The effective weight, read-only (dequantized on read)."""
        return QuantizedWeight(self)

    def dequantize(self) -> Tensor:
        """The dequantized base weight W0 (fp32, (out, in)), ignoring any merge."""
        return self.scheme.dequantize({k: getattr(self, k) for k in self._packed_names}, self.weight_shape)

    def dense_weight(self) -> Tensor:
        """The weight the forward uses: the merged fp32 weight if an adapter is merged, else W0."""
        return self.merged_weight if self.merged_weight is not None else self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged_weight is not None:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, self.merged_weight.to(x.dtype), bias)
        return _DequantLinear.apply(x, self, self.bias)

    @torch.no_grad()
    def merge_delta(self, delta: Tensor) -> None:
        """Hold W0 + ΔW in fp32 (exact up to one fp32 add); the packed bits stay untouched.

        Args:
            delta: ΔW, fp32, shaped (out, in).

        Raises:
            MergeError: when something is merged already or the shape is wrong.
        """
        if self.merged_weight is not None:
            raise MergeError("this quantized layer already holds a merged adapter; unmerge it first")
        if delta.shape != self.weight_shape:
            raise MergeError(f"ΔW of shape {tuple(delta.shape)} does not fit weight {tuple(self.weight_shape)}")
        self.merged_weight = self.dequantize() + delta.to(device=self.qdata.device, dtype=torch.float32)

    def unmerge_delta(self) -> None:
        """Back to the quantized base exactly (drops the fp32 merged weight)."""
        self.merged_weight = None

    def extra_repr(self) -> str:
        merged = ", merged (fp32)" if self.merged_weight is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"bias={self.bias is not None}{merged}")


class QuantizedLinearKind(LayerKind):
    """The layer kind of :class:`QuantizedLinear`: shapes from its (out, in) weight view, merges kept in fp32,
    no fused path (the fused op would read the packed bits as a dense weight)."""

    name = "quantized-linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, QuantizedLinear)

    def fast_path(self, base: nn.Module) -> bool:
        return False

    @torch.no_grad()
    def add_to_weight(self, base: nn.Module, dw: Tensor, sign: float = 1.0) -> None:
        """Merge (sign > 0): hold W0 + ΔW in fp32; unmerge (sign < 0): restore the quantized W0 exactly.

        Args:
            base: a QuantizedLinear.
            dw: ΔW in (out, in) layout, fp32.
            sign: +1 to merge, -1 to unmerge.
        """
        if sign > 0:
            base.merge_delta(dw)
        else:
            base.unmerge_delta()


QUANTIZED_LINEAR = QuantizedLinearKind()
register_kind(QUANTIZED_LINEAR)


# -- whole models ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_base` did."""

    scheme: str
    layers: tuple[str, ...]
    dense_bytes: int  # the quantized layers' weights before, fp32
    packed_bytes: int  # the same weights after, statistics included

    def summary(self) -> str:
        """One line for the terminal."""
        return (f"quantized {len(self.layers)} linear layers to {self.scheme}: "
                f"{self.dense_bytes / 2**20:.1f} MiB → {self.packed_bytes / 2**20:.1f} MiB")


def _heads(model: nn.Module) -> list[nn.Module]:
    """The output head, task heads and the pooler feeding them: trained or saved with adapters, kept dense."""
    heads = [getattr(model, n) for n in TASK_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(getattr(backbone, POOLER_NAME, None), nn.Module):
        heads.append(getattr(backbone, POOLER_NAME))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return heads + ([output] if isinstance(output, nn.Module) else [])


def _protected(model: nn.Module, include_head: bool) -> set[int]:
    """ids of modules never quantized: adapter state (LoRA, saved copies) and, unless asked, the heads."""
    out: set[int] = set()
    for _, host in model.named_modules():
        if isinstance(host, AdapterHost):
            for child in host.ADAPTER_CHILDREN:
                out.update(id(m) for m in getattr(host, child).modules())
    if not include_head:
        out.update(id(m) for head in _heads(model) for m in head.modules())
    return out


def _candidates(model: nn.Module, skip: Sequence[str], include_head: bool) -> list[tuple[str, nn.Linear]]:
    """The (name, Linear) pairs to quantize; every ``skip`` pattern must match one of the model's linears."""
    protected = _protected(model, include_head)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in protected]
    hit = lambda pat, name: fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, f"*.{pat}")  # noqa: E731
    for pattern in skip:
        if not any(hit(pattern, n) for n, _ in linears):
            raise ConfigError(f"quantize skip pattern {pattern!r} matches no linear layer of the model")
    return [(n, m) for n, m in linears if not any(hit(p, n) for p in skip)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    if isinstance(parent, AdapterHost) and hasattr(parent, "kind"):
        parent.kind = kind_of(new)  # a LoRA layer wrapping it now follows the quantized kind


def _release_dense_memory(model: nn.Module) -> None:
    """Return the replaced fp32 weights' memory to the OS, so RSS shows the saving.

    transformers maps the checkpoint file and hands out views of it: the mapping (and every page the
    quantizer read) stays resident while any parameter still views it, so the remaining dense parameters
    get storage of their own. glibc keeps freed heap pages unless trimmed.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()  # tied parameters are one object: they stay tied
    gc.collect()
    trim_heap()


def quantize_base(
    model: nn.Module,
    scheme: str = "nf4",
    *,
    skip: Sequence[str] = (),
    include_head: bool = False,
    fill: Callable[[str, nn.Linear], None] | None = None,
) -> QuantizationReport:
    """Quantize the frozen linear weights of ``model`` in place (before or after injecting LoRA).

    LoRA A/B, saved module copies and embeddings are never quantized; the heads (LM output head, task
    heads such as ``classifier``/``score`` and the pooler feeding them) only with ``include_head``.
    Quantized weights are buffers, so the base stays frozen whatever the optimizer sees.

    Args:
        model: the model.
        scheme: ``"nf4"`` or ``"int8"``.
        skip: module-name patterns (fnmatch, matched on the full name or its dotted tail) to keep dense.
        include_head: quantize the heads too (a tied LM head is then untied from the input embedding).
        fill: called as ``fill(name, linear)`` just before each layer is quantized, to load its weights
            into an uninitialised model one layer at a time (:func:`lorakit.quant.load.load_quantized`).

    Raises:
        ConfigError: unknown scheme, a skip pattern matching nothing, bitsandbytes missing.
        TargetError: the model is quantized already, has a merged adapter, or has no linear layer to quantize.
    """
    get_scheme(scheme)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise TargetError("the model is quantized already; load the base again to quantize it another way")
    if any(getattr(m, "merged_adapter", None) is not None for m in model.modules()):
        raise TargetError("unmerge adapters before quantizing (a merged ΔW would be rounded into the base)")
    targets = _candidates(model, skip, include_head)
    if not targets:
        raise TargetError("no linear layer to quantize (all skipped, or the model has none)")
    names, dense, packed = tuple(n for n, _ in targets), 0, 0
    while targets:  # popped, so each fp32 weight is freed once its layer is replaced, not at the end
        name, linear = targets.pop(0)
        if fill is not None:
            fill(name, linear)
        q = QuantizedLinear(linear, scheme)
        dense += linear.weight.numel() * 4
        packed += sum(getattr(q, k).numel() * getattr(q, k).element_size() for k in q._packed_names)
        _replace(model, name, q)
        del linear
    if fill is None:
        _release_dense_memory(model)
    return QuantizationReport(scheme, names, dense, packed)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """Every QuantizedLinear of ``model`` as (qualified name, module).

    Args:
        model: any module.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
