"""Full copies of a module trained and saved with an adapter (PEFT's modules_to_save), one per adapter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.lora.kinds import AdapterHost


class ModuleCopies(AdapterHost):
    """A module trained and saved with an adapter (PEFT's modules_to_save), one copy per adapter.

    The original stays untouched so disabling adapters gives the base model back.
    """

    ADAPTER_CHILDREN = ("copies",)
    ADAPTER_LABEL = "modules_to_save copy"

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.routing_names: tuple[str | None, ...] = ()
        self.row_index: Tensor | None = None

    def add_copy(self, name: str) -> nn.Module:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def current(self) -> nn.Module:
        if self.active_adapter is not None and self.active_adapter in self.copies:
            return self.copies[self.active_adapter]
        return self.original_module

    def route(self, names: tuple[str | None, ...], row_index: Tensor | None) -> None:
        self.routing_names, self.row_index = names, row_index

    def forward(self, *args, **kwargs):
        if self.row_index is None:
            return self.current()(*args, **kwargs)
        # Saved modules are small heads: run each distinct copy once, then pick each row's output.
        outs = torch.stack([
            self.copies[n](*args, **kwargs) if n in self.copies else self.original_module(*args, **kwargs)
            for n in self.routing_names
        ])
        index = self.row_index.to(outs.device)
        if outs.shape[1] != index.shape[0]:
            index = index.repeat_interleave(outs.shape[1] // index.shape[0])
        return outs[index, torch.arange(outs.shape[1], device=outs.device)]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code reads attributes of the wrapped module (e.g. classifier.out_features).
            return getattr(self.current(), name)
