"""Frozen ``nn.Linear`` layers multiplied through oneDNN with their weight packed once, for inference.

PyTorch's CPU ``F.linear`` in fp32 goes to MKL's sgemm, which re-reads the weight in its plain layout on
every call; oneDNN's matmul on a weight reordered once into its blocked layout runs the small-batch
products of decoding faster, the wide LM head most (measured in docs/records/performance.md). The packed
copy is extra memory (one more copy of every packed weight), so packing is something a server opts into.

A packed layer stays an ``nn.Linear`` (same parameters, same state-dict keys, still a LoRA target); only its
no-grad forward changes. The packed copy is rebuilt when the weight changes in place (a merge, a PiSSA
adapter loaded or deleted): it is keyed by the weight's storage and version counter.

Sibling projections that read the same input (a block's q, k and v; gate and up: the family's
``shared_input`` in ``lorakit.lora.arch``) share one packed product: the first of them called with an input
computes all their outputs in one matmul over their stacked weights, the others take their columns. An
input is recognised by identity (the group holds it until every member took its part), so a member called
with another tensor recomputes and stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.lora.arch import family_of


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear (CPU builds for x86-64 and arm64 do)."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") and hasattr(
        ops, "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose no-grad fp32 CPU forward uses a oneDNN-packed copy of its weight."""

    batch_hint: int = 32  # the row count oneDNN tunes its packed layout for
    _packed: tuple[tuple, Tensor] | None = None  # (weight data_ptr and version, packed copy)
    shared: SharedInput | None = None  # the group whose one product computes this layer's output

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if torch.is_grad_enabled() or x.dtype != torch.float32 or not _packable(weight):
            return F.linear(x, weight, self.bias)
        if self.shared is not None:
            return self.shared.output(self, x)
        return _packed_product(x, self._packed_weight(), self.bias)

    def _packed_weight(self) -> Tensor:
        key = _weight_key([self.weight])
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), self.batch_hint))
        return self._packed[1]


class SharedInput:
    """Packed layers that read the same input, multiplied as one product of their stacked weights.

    Args:
        members: the layers, in output-column order (same input size, all with a bias or none).
    """

    def __init__(self, members: list[PackedLinear]) -> None:
        self.members = members
        ends = torch.tensor([m.out_features for m in members]).cumsum(0).tolist()
        self.spans = {id(m): (end - m.out_features, end) for m, end in zip(members, ends)}
        self._packed: tuple[tuple, Tensor, Tensor | None] | None = None
        self._input: Tensor | None = None  # held (not just its id) so its memory cannot be reused meanwhile
        self._key: tuple[int, ...] = ()
        self._output: Tensor | None = None
        self._waiting: set[int] = set()  # members that have not taken their columns of the current output

    def output(self, member: PackedLinear, x: Tensor) -> Tensor:
        """``member``'s output for ``x``: its columns of the group's product, computed on first use."""
        key = (0 if x.is_inference() else x._version, x.data_ptr())
        if self._input is not x or self._key != key or id(member) not in self._waiting:
            weight, bias = self._packed_weight()
            self._input, self._key = x, key
            self._output = _packed_product(x, weight, bias)
            self._waiting = set(self.spans)
        self._waiting.discard(id(member))
        start, end = self.spans[id(member)]
        out = self._output[..., start:end]  # a view: transformers' blocks only split its last dimension
        if not self._waiting:
            self._input = self._output = None
        return out

    def _packed_weight(self) -> tuple[Tensor, Tensor | None]:
        key = _weight_key([m.weight for m in self.members])
        if self._packed is None or self._packed[0] != key:
            weight = torch.cat([m.weight.detach() for m in self.members])
            bias = None if self.members[0].bias is None else torch.cat([m.bias.detach() for m in self.members])
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.members[0].batch_hint)
            self._packed = (key, packed, bias)
        return self._packed[1], self._packed[2]


def _packed_product(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _weight_key(weights: list[Tensor]) -> tuple:
    return tuple((w.data_ptr(), w._version) for w in weights)


def _packable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and not weight.requires_grad


def pack_linears(model: nn.Module, batch_hint: int = 32) -> int:
    """Make every frozen fp32 CPU ``nn.Linear`` of ``model`` a ``PackedLinear`` (in place); how many.

    Only exact ``nn.Linear`` instances are converted: quantized and custom subclasses keep their forward.
    Nothing is packed until a layer's first no-grad forward. Sibling projections of the model family's
    ``shared_input`` groups are multiplied as one product (``SharedInput``).

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
    _share_inputs(model)
    return count


def _share_inputs(model: nn.Module) -> None:
    """Group each block's ``shared_input`` siblings (the plain layers under any LoRA wrapper)."""
    family = family_of(model)
    modules = dict(model.named_modules())
    for group in family.shared_input if family is not None else ():
        for name in modules:
            if not name.endswith("." + group[0]):
                continue
            prefix = name[: -len(group[0])]
            members = [_plain(modules, prefix + member) for member in group]
            if _fusable(members):
                shared = SharedInput(members)
                for layer in members:
                    layer.shared = shared


def _plain(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The module at ``name``, or the layer a LoRA wrapper there holds as ``base_layer``."""
    module = modules.get(name)
    return modules.get(name + ".base_layer", module) if module is not None else None


def _fusable(members: list[nn.Module | None]) -> bool:
    if not all(type(m) is PackedLinear for m in members):
        return False
    return len({m.in_features for m in members}) == 1 and len({m.bias is None for m in members}) == 1


def unpack_linears(model: nn.Module) -> int:
    """Turn every ``PackedLinear`` of ``model`` back into a plain ``nn.Linear`` and free its packed copy.

    Args:
        model: a model ``pack_linears`` converted.
    """
    count = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            for attribute in ("_packed", "batch_hint", "shared"):
                module.__dict__.pop(attribute, None)
            module.__class__ = nn.Linear
            count += 1
    return count
