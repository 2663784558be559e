"""Frozen ``nn.Linear`` layers multiplied through oneDNN with their weight packed once, for inference.

PyTorch's CPU ``F.linear`` in fp32 goes to MKL's sgemm, which re-reads the weight in its plain layout on
every call; oneDNN's matmul on a weight reordered once into its blocked layout runs the small-batch
products of decoding faster, the wide LM head most (measured in docs/records/performance.md). The packed
copy is extra memory (one more copy of every packed weight), so packing is something a server opts into.

A packed layer stays an ``nn.Linear`` (same parameters, same state-dict keys, still a LoRA target); only its
no-grad forward changes. The packed copy is rebuilt when the weight changes in place (a merge, a PiSSA
adapter loaded or deleted): it is keyed by the weight's storage and version counter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear (CPU builds for x86-64 and arm64 do)."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") and hasattr(
        ops, "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose no-grad fp32 CPU forward uses a oneDNN-packed copy of its weight."""

    batch_hint: int = 32  # the row count oneDNN tunes its packed layout for
    _packed: tuple[int, int, Tensor] | None = None  # (weight data_ptr, weight version, packed copy)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if torch.is_grad_enabled() or x.dtype != torch.float32 or not _packable(weight):
            return F.linear(x, weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def _packed_weight(self) -> Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed[:2] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.batch_hint)
            self._packed = (*key, packed)
        return self._packed[2]


def _packable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and not weight.requires_grad


def pack_linears(model: nn.Module, batch_hint: int = 32) -> int:
    """Make every frozen fp32 CPU ``nn.Linear`` of ``model`` a ``PackedLinear`` (in place); how many.

    Only exact ``nn.Linear`` instances are converted: quantized and custom subclasses keep their forward.
    Nothing is packed until a layer's first no-grad forward.

    Args:
        model: the model to serve (its adapters' own matrices are not ``nn.Linear`` and stay as they are).
        batch_hint: the typical number of rows per product (a server's batch size).
    """
    if not packing_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and _packable(module.weight):
            module.__class__ = PackedLinear
            module.batch_hint = batch_hint
            count += 1
    return count


def unpack_linears(model: nn.Module) -> int:
    """Turn every ``PackedLinear`` of ``model`` back into a plain ``nn.Linear`` and free its packed copy.

    Args:
        model: a model ``pack_linears`` converted.
    """
    count = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__dict__.pop("_packed", None)
            module.__dict__.pop("batch_hint", None)
            module.__class__ = nn.Linear
            count += 1
    return count
