"""Helpers for the export tests: real SmolLM2 adapters with non-zero B, and lorakit's own ΔW."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorakit import LoraConfig, inject, save_adapter
from lorakit.io.files import load_adapter
from lorakit.io.models import load_model
from lorakit.lora.adapters import merge_and_unload


def make_adapter(path: Path, seed: int = 0, **config) -> Path:
    """A SmolLM2 adapter with random A and B (B is zero at init, which would test nothing), saved at ``path``.

    Args:
        path: where to save it.
        seed: the random seed.
        **config: LoraConfig fields.
    """
    model, _ = load_model("smollm2-135m")
    inject(model, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the adapter's A and B: everything else is frozen
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(model, path)
    return path


def lorakit_delta_w(adapter: Path) -> dict[str, np.ndarray]:
    """{module: merged weight - base weight} as lorakit's own merge computes it (fp32, HF row order).

    Args:
        adapter: an adapter directory for SmolLM2.
    """
    model, _ = load_model("smollm2-135m")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_adapter(model, adapter)
    merged = merge_and_unload(model).state_dict()
    return {k[: -len(".weight")]: (merged[k] - before[k]).double().numpy()
            for k in before if k.endswith(".weight") and not torch.equal(merged[k], before[k])}
