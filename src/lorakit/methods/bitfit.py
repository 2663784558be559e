"""BitFit (Ben Zaken et al., 2021): train only the bias vectors (and the task head)."""

from __future__ import annotations

from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.finetune import freeze_all, head_modules, unfreeze_head


def bias_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter called ``bias`` outside the task head (the head trains separately)."""
    heads = tuple(name + "." for name, _ in head_modules(model))
    params = model.named_parameters()
    return [(n, p) for n, p in params if n.rpartition(".")[2] == "bias" and not n.startswith(heads)]


def apply_bitfit(model: nn.Module, train_head: bool = True) -> None:
    biases = bias_parameters(model)
    if not biases:
        # Llama-style models have no bias vectors at all: BitFit would silently train nothing.
        model_type = getattr(model.config, "model_type", "?")
        raise ConfigError(
            f"bitfit: {type(model).__name__} ({model_type}) has no bias vectors, so there is nothing for "
            "BitFit to train; use another method for this architecture"
        )
    freeze_all(model)
    for _, p in biases:
        p.requires_grad_(True)
    unfreeze_head(model, train_head)
