"""Cost arithmetic (``estimate``) and post-hoc analysis of learned adapters (``analyze``)."""

from lorakit.analysis.arch_spec import PRESETS, ArchSpec, arch_from_config, load_arch, total_params
from lorakit.analysis.estimate import Estimate, MemoryEstimate, estimate, lora_trainable_params
from lorakit.analysis.subspace import (
    LoraFactors,
    analyze_adapters,
    delta_w_svd,
    delta_w_vs_w,
    energy_captured,
    expected_random_similarity,
    random_similarity_grid,
    read_lora_matrices,
    subspace_similarity,
    subspace_similarity_grid,
    top_right_singular_vectors,
    weight_from_model,
)

__all__ = [
    "PRESETS",
    "ArchSpec",
    "Estimate",
    "LoraFactors",
    "MemoryEstimate",
    "analyze_adapters",
    "arch_from_config",
    "delta_w_svd",
    "delta_w_vs_w",
    "energy_captured",
    "estimate",
    "expected_random_similarity",
    "load_arch",
    "lora_trainable_params",
    "random_similarity_grid",
    "read_lora_matrices",
    "subspace_similarity",
    "subspace_similarity_grid",
    "top_right_singular_vectors",
    "total_params",
    "weight_from_model",
]
