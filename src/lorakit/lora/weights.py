"""One adapter's weights on one layer: its spec (rank, scaling, slices, init, DoRA) and the (A, B) pairs,
one per adapted slice of a fused projection (``WHOLE`` for an unsliced layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.errors import TargetError
from lorakit.lora.arch import QKV_SLICES, slice_span
from lorakit.lora.kinds import LayerKind, kind_of
from lorakit.lora.variants import RESIDUAL_INITS

WHOLE = "whole"  # key of the single (A, B) pair of an unsliced adapter


def layer_kind(module: nn.Module) -> str:
    """The name of ``module``'s layer kind (``linear``, ``conv1d``, ``embedding``).

    Args:
        module: a base layer.

    Raises:
        TargetError: when lorakit cannot adapt it.
    """
    return kind_of(module).name


@dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to build one adapter's weights for one layer.

    ``init_std`` None means 1/r, ``LoraConfig``'s default. ``fused`` lists all slices of a fused
    projection in output order when ``slices`` picks some of them. ``init`` "pissa" / "olora" and
    ``use_dora`` are the variants of ``lorakit.lora.variants``.
    """

    r: int
    scaling: float
    dropout: float = 0.0
    slices: tuple[str, ...] | None = None
    init: str = "gaussian"
    init_std: float | None = None
    fused: tuple[str, ...] = QKV_SLICES
    use_dora: bool = False


class LoraWeights(nn.Module):
    """One adapter's (A, B) pairs for one base layer: one pair, or one per fused slice."""

    def __init__(self, in_features: int, out_features: int, spec: AdapterSpec, kind: LayerKind) -> None:
        super().__init__()
        self.r = spec.r
        self.scaling = spec.scaling
        self.kind = kind
        self.slices = spec.slices
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        # DoRA's magnitude m (one per output; the layer sets it to ‖W0 + s·B·A‖ per row).
        self.magnitude = nn.Parameter(torch.ones(out_features)) if spec.use_dora else None
        # PiSSA/OLoRA: the initial (A0, B0) per slot, whose s·B0·A0 the base weight gave up.
        self.residual: dict[str, tuple[Tensor, Tensor]] | None = None
        # Output column ranges each (A, B) pair writes to.
        self.spans: dict[str, tuple[int, int]] = {}
        if spec.slices is None:
            self.spans[WHOLE] = (0, out_features)
        else:
            for s in spec.slices:
                try:
                    self.spans[s] = slice_span(out_features, spec.fused, s)
                except ValueError as exc:
                    raise TargetError(str(exc)) from None
        for key, (start, stop) in self.spans.items():
            a = torch.empty(spec.r, in_features)
            if spec.init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default, as PEFT and loralib use
            elif spec.init in RESIDUAL_INITS:
                a.zero_()  # set from W0 by LoraLayer once the weights sit on the base's device
            else:
                nn.init.normal_(a, std=spec.init_std if spec.init_std is not None else 1.0 / spec.r)
            self.A[key] = nn.Parameter(a)
            # B = 0: training starts exactly at the pretrained model.
            self.B[key] = nn.Parameter(torch.zeros(stop - start, spec.r))

    def delta(self, x: Tensor, out_features: int, *, drop: bool = True) -> Tensor:
        """s·B·A·dropout(x) for a batch, laid out like the base output (``drop=False``: x is dropped already)."""
        dropout = self.dropout if drop else nn.Identity()
        pieces = {k: self.kind.project_in(x, self.A[k], dropout) @ self.B[k].t() for k in self.spans}
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
