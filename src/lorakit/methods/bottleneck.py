"""Bottleneck adapters: Houlsby (``adapter_h``), Lin (``adapter_l``) and Pfeiffer (``adapter_p``).

An adapter maps a sub-layer's output h to h + up(act(down(norm(h)))). It is attached to the attention
output projection and/or the MLP output projection of every block as a child module plus a forward hook,
so no model code is edited and the base parameter names stay exactly as transformers wrote them (LoRA
targets, ``load_state_dict`` and ``save_pretrained`` still work). ``up`` starts at zero, so a freshly
adapted model computes exactly the base model's outputs.

- ``adapter_h`` (Houlsby et al., 2019): after the attention output and after the MLP.
- ``adapter_l`` (Lin et al., 2020): after the MLP only, with its own LayerNorm on the adapter input.
- ``adapter_p`` (Pfeiffer et al., 2021): after the MLP only, no extra LayerNorm.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.lora.arch import families, family_of
from lorakit.methods.finetune import freeze_all, transformer_blocks, unfreeze, unfreeze_head

ATTR = "lorakit_adapter"  # the child module each adapted projection carries


def _sites() -> dict[str, tuple[str, str]]:
    """Per family: (attention output projection, MLP output projection), relative to the block."""
    return {name: family.output_sites for name, family in families().items()}


VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    # name → (sites, adapter has its own LayerNorm)
    "adapter_h": (("attn", "mlp"), False),
    "adapter_l": (("mlp",), True),
    "adapter_p": (("mlp",), False),
}

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """h + up(act(down(norm(h)))), with ``up`` zero-initialised so it starts as the identity."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu", layer_norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layer_norm else None
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        x = h.to(self.down.weight.dtype)
        if self.norm is not None:
            x = self.norm(x)
        # h + exact zero is h bit for bit, so the zero-initialised adapter reproduces the base exactly.
        return h + self.up(self.act(self.down(x))).to(h.dtype)


def _run_adapter(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    # A module-level hook (not a closure) so deepcopy/pickling of the model keeps working.
    return getattr(module, ATTR)(output)


def _out_features(module: nn.Module) -> int:
    out = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if not out:
        raise ConfigError(f"cannot tell the output width of a {type(module).__name__} to place an adapter")
    return int(out)


def adapter_sites(model: nn.Module, which: tuple[str, ...]) -> list[str]:
    """Qualified names of the projections to adapt: the first known layout that fits every block."""
    blocks = transformer_blocks(model)
    sites = _sites()
    own = family_of(model)
    for family in sorted(sites, key=lambda f: own is None or f != own.name):  # the model's own family first
        rel = dict(zip(("attn", "mlp"), sites[family]))
        names = [f"{block_name}.{rel[w]}" for block_name, _ in blocks for w in which]
        try:
            for name in names:
                model.get_submodule(name)
        except AttributeError:
            continue
        return names
    raise ConfigError(
        f"cannot place adapters in {type(model).__name__}: its blocks have none of the known layouts "
        f"{sites}"
    )


def adapters(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapter]]:
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter):
            yield name, module


def apply_adapter(
    model: nn.Module,
    variant: str,
    bottleneck: int = 16,
    activation: str = "relu",
    train_head: bool = True,
) -> None:
    """Attach ``variant``'s adapters to every block; only they (and the task head) train."""
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ConfigError(f"{variant}: bottleneck must be a positive integer, got {bottleneck!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{variant}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    which, layer_norm = VARIANTS[variant]
    sites = adapter_sites(model, which)
    freeze_all(model)
    for name in sites:
        proj = model.get_submodule(name)
        if hasattr(proj, ATTR):
            raise ConfigError(f"{name} already carries an adapter")
        weight = next(proj.parameters())
        adapter = BottleneckAdapter(_out_features(proj), bottleneck, activation, layer_norm)
        # Adapters train in fp32 even on a bf16 base (like lorakit's LoRA weights).
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        adapter.to(device=weight.device, dtype=dtype)
        setattr(proj, ATTR, adapter)
        proj.register_forward_hook(_run_adapter)
        unfreeze(adapter)
    unfreeze_head(model, train_head)
