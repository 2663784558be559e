"""Layer kinds and the adapter-parameter protocol: the leaf both ``layers`` and ``targets`` build on.

A :class:`LayerKind` is everything lorakit needs to know about one type of base layer: whether a module is
one, its shapes (read from the base weight), how the low-rank term meets an input, how ΔW (always formed
as (out, in)) is laid into the base weight and merged, and whether the fused training path applies.
``kind_of`` tries the kinds in order; a new base type (a quantized linear, say) is one more ``LayerKind``
subclass passed to :func:`register_kind`, nothing else changes (``docs/architecture.md``).

:class:`AdapterHost` is the protocol of modules that hold adapter parameters next to a base (torchtune's
``adapter_params()``): ``LoraLayer`` and ``ModuleCopies`` declare theirs, so nobody recognises them by
name substrings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import TargetError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer storing its weight transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


class LayerKind:
    """A type of base layer lorakit can wrap. Subclasses override what differs from a plain ``nn.Linear``.

    Attributes:
        name: the kind's name (shown in ``repr`` and errors).
        sliceable: whether a fused projection of this kind can be adapted slice by slice.
        supports_variants: whether DoRA and PiSSA/OLoRA initialisation apply to it.
        file_style: how PEFT names its tensors: ``"linear"`` (``lora_A.weight``) or ``"embedding"``
            (``lora_embedding_A``, a parameter without ``.weight``).
    """

    name: ClassVar[str] = "linear"
    sliceable: ClassVar[bool] = True
    # Whether DoRA's magnitude and PiSSA/OLoRA's residual apply (a weight matrix acting on features).
    supports_variants: ClassVar[bool] = True
    file_style: ClassVar[str] = "linear"
    # Whether the base weight is stored (in, out) rather than nn.Linear's (out, in).
    transposed: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a base layer of this kind."""
        return isinstance(module, nn.Linear)

    def in_features(self, weight: Tensor) -> int:
        """Input width from the base weight."""
        return weight.shape[0] if self.transposed else weight.shape[1]

    def out_features(self, weight: Tensor) -> int:
        """Output width from the base weight."""
        return weight.shape[1] if self.transposed else weight.shape[0]

    def to_base_layout(self, dw: Tensor) -> Tensor:
        """ΔW formed as (out, in), laid out like the base weight."""
        return dw.t() if self.transposed else dw

    def weight_out_in(self, base: nn.Module) -> Tensor:
        """The base weight as a dense (out, in) matrix (a quantized kind dequantizes here)."""
        w = base.weight
        return w.t() if self.transposed else w

    @torch.no_grad()
    def set_weight(self, base: nn.Module, weight_out_in: Tensor) -> None:
        """Overwrite the base weight with a dense (out, in) matrix (PiSSA/OLoRA residuals), in its dtype."""
        w = base.weight
        w.copy_(self.to_base_layout(weight_out_in).to(w.dtype))

    def lora_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The layer input as the low-rank term consumes it (in the adapter's dtype)."""
        return x.to(dtype)

    def project_in(self, x: Tensor, a: Tensor, dropout: nn.Module) -> Tensor:
        """``A·dropout(x)`` for a batch: the rank-r activations."""
        return dropout(x) @ a.t()

    def routed_project_in(self, x: Tensor, index: Tensor, a_stack: Tensor) -> Tensor | None:
        """Per-row ``A[index[b]]·x[b]`` when this kind needs its own gather; None: the generic bmm path."""
        return None

    def fast_path(self, base: nn.Module) -> bool:
        """Whether ``lorakit.lora.kernels.lora_linear`` may stand in for ``base``'s forward."""
        return type(base) is nn.Linear  # subclasses (quantized, custom) keep their own forward

    @torch.no_grad()
    def add_to_weight(self, base: nn.Module, dw: Tensor, sign: float = 1.0) -> None:
        """``W += sign·ΔW`` in place, ΔW in the base layout; in fp32, rounding once to the weight's dtype.

        Args:
            base: the base layer.
            dw: ΔW in the base weight's layout (fp32).
            sign: +1 to merge, -1 to unmerge.
        """
        w = base.weight
        w.copy_((w.float() + sign * dw.to(w.device)).to(w.dtype))

    def __repr__(self) -> str:
        return self.name


class Conv1DKind(LayerKind):
    """transformers' Conv1D: ``x·W + b`` with W stored (in, out)."""

    name = "conv1d"
    transposed = True

    def matches(self, module: nn.Module) -> bool:
        return is_conv1d(module)

    def fast_path(self, base: nn.Module) -> bool:
        return True


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: the input is token ids, A is a lookup table (PEFT's ``lora_embedding_A``)."""

    name = "embedding"
    sliceable = False
    supports_variants = False
    file_style = "embedding"
    transposed = True  # weight is (num_embeddings = in, dim = out)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def lora_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x  # token ids stay integers

    def project_in(self, x: Tensor, a: Tensor, dropout: nn.Module) -> Tensor:
        return F.embedding(x, a.t())

    def routed_project_in(self, x: Tensor, index: Tensor, a_stack: Tensor) -> Tensor | None:
        # ax[b, t] = A_stack[index[b]][:, ids[b, t]]
        return a_stack.transpose(1, 2)[index[:, None], x]

    def fast_path(self, base: nn.Module) -> bool:
        return False


LINEAR = LayerKind()
CONV1D = Conv1DKind()
EMBEDDING = EmbeddingKind()
# Tried in order: the first kind whose ``matches`` accepts a module is its kind.
_KINDS: list[LayerKind] = [EMBEDDING, CONV1D, LINEAR]


def register_kind(kind: LayerKind) -> None:
    """Add a layer kind, tried before the built-in ones (so a subclass of nn.Linear can claim its own).

    Args:
        kind: the kind object.
    """
    _KINDS[:] = [k for k in _KINDS if k.name != kind.name]
    _KINDS.insert(0, kind)


def kinds() -> list[LayerKind]:
    """The known layer kinds, in the order they are tried."""
    return list(_KINDS)


def find_kind(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``, or None when lorakit cannot adapt it."""
    return next((k for k in _KINDS if k.matches(module)), None)


def kind_of(module: nn.Module) -> LayerKind:
    """The kind of ``module``.

    Args:
        module: a base layer.

    Raises:
        TargetError: when no kind accepts it.
    """
    kind = find_kind(module)
    if kind is None:
        raise TargetError(f"lorakit cannot adapt a {type(module).__name__}")
    return kind


def supported_names() -> str:
    """The adaptable layer types, for error messages."""
    return "nn.Linear, transformers Conv1D, nn.Embedding" + "".join(
        f", {k.name}" for k in _KINDS if k not in (LINEAR, CONV1D, EMBEDDING)
    )


# -- adapter-parameter protocol ------------------------------------------------------------------------
class AdapterHost(nn.Module):
    """A module holding adapter parameters beside a frozen base (torchtune's ``adapter_params()``).

    Subclasses name the children that hold adapter state in ``ADAPTER_CHILDREN``; everything under them is
    adapter state, everything else belongs to the base model.
    """

    ADAPTER_CHILDREN: ClassVar[tuple[str, ...]] = ()
    # How parameter_report labels this host's adapter parameters.
    ADAPTER_LABEL: ClassVar[str] = "adapter"
    # Whether a target may name this host (it wraps an adaptable base layer and takes more adapters).
    TARGETABLE: ClassVar[bool] = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter parameters, by name relative to this module."""
        out: dict[str, nn.Parameter] = {}
        for child in self.ADAPTER_CHILDREN:
            module = getattr(self, child)
            out.update({f"{child}.{n}": p for n, p in module.named_parameters()})
        return out


def adapter_hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """Every :class:`AdapterHost` in ``model`` as (qualified name, module)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterHost):
            yield name, module


def adapter_param_names(model: nn.Module) -> dict[str, str]:
    """{qualified parameter name: its host's label} for every adapter parameter of ``model``.

    Args:
        model: any module (no adapters: an empty dict).
    """
    out: dict[str, str] = {}
    for host_name, host in adapter_hosts(model):
        prefix = f"{host_name}." if host_name else ""
        out.update({prefix + n: host.ADAPTER_LABEL for n in host.adapter_params()})
    return out

