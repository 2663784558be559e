"""LoRA variants beyond the paper, as PEFT defines them: DoRA's magnitude, PiSSA and OLoRA initialisation.

* DoRA (Liu et al. 2024): ``W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row``. The row norm is treated as a
  constant in backward (paper §4.3, as PEFT does), and ``m`` starts at ``‖W0‖_row``.
* PiSSA (Meng et al. 2024): A, B from the top-r singular triplets of W0; OLoRA (Büyükakyüz 2024): from a
  QR decomposition of W0. Both replace W0 by the residual ``W0 − s·B0·A0``, so the model starts unchanged.

Everything works on ΔW and W in (out, in) layout, in fp32; the layer kind (``lorakit.lora.kinds``) maps layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RESIDUAL_INITS = ("pissa", "olora")  # inits that move part of W0 into the adapter


def dora_norm(weight: Tensor, delta: Tensor) -> Tensor:
    """``‖W0 + ΔW‖`` per output row (fp32, no gradient), the denominator of DoRA's direction.

    Args:
        weight: W0 as (out, in).
        delta: s·B·A as (out, in).
    """
    return torch.linalg.norm(weight.float() + delta.detach().float(), dim=1).detach()


def dora_extra(
    x: Tensor, wx: Tensor, lora: Tensor, magnitude: Tensor, norm: Tensor
) -> Tensor:
    """What DoRA adds to the base output: ``(m/‖·‖ − 1)·W0·x + (m/‖·‖)·s·B·A·x`` (PEFT's formula).

    Args:
        x: the (dropped-out) input; only its dtype is used.
        wx: ``W0·x`` without bias, laid out like the output.
        lora: ``s·B·A·x``.
        magnitude: m, one value per output.
        norm: ``dora_norm`` of the layer.
    """
    scale = (magnitude / norm).to(x.dtype)
    return (scale - 1) * wx + scale * lora


def base_product(x: Tensor, weight_out_in: Tensor) -> Tensor:
    """``W0·x`` without bias, in x's dtype."""
    return F.linear(x, weight_out_in.to(x.dtype))


def dora_merged_delta(weight: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """The ΔW that turns W0 into the merged DoRA weight ``m/‖·‖ ⊙ (W0 + ΔW)`` (all (out, in), fp32)."""
    factor = (magnitude.float() / norm)[:, None]
    w = weight.float()
    return factor * (w + delta) - w


def dora_unmerged_delta(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """The ΔW merging added, recovered from the merged weight and the norm recorded at merge time."""
    factor = (magnitude.float() / norm)[:, None]
    w = merged.float()
    return w - (w / factor - delta)


def residual_init(kind: str, weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A0 (r, in), B0 (out, r)) of a PiSSA or OLoRA initialisation of ``weight`` (out, in), as PEFT forms
    them; the caller replaces W0 by ``W0 − scaling·B0·A0``.

    Args:
        kind: ``"pissa"`` or ``"olora"``.
        weight: W0 as (out, in).
        r: the rank.
        scaling: the adapter's scaling s.
    """
    w = weight.detach().float()
    if kind == "pissa":
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        sr = s[:r] / scaling
        return torch.diag(torch.sqrt(sr)) @ uh[:r], v[:, :r] @ torch.diag(torch.sqrt(sr))
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()
