"""The merged model an hf or gguf export writes: the base with the adapter folded in by lorakit's merge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.io.files import AdapterFile


@dataclass
class Merged:
    """A merged model, its tokenizer, and the state-dict keys the merge changed."""

    model: nn.Module
    tokenizer: object
    changed: list[str]


def load_merged(parsed: AdapterFile, adapter: Path, base: str) -> Merged:
    """Load ``base``, fold the adapter in and note which weights changed (exactly, not approximately).

    Args:
        parsed: the adapter, as read.
        adapter: its folder.
        base: the base's name as ``load_model`` takes it.
    """
    from lorakit.io.files import load_adapter
    from lorakit.io.models import load_model
    from lorakit.lora.adapters import merge_and_unload

    task = "seq-cls" if parsed.raw_config.get("task_type") == "SEQ_CLS" else "causal-lm"
    kwargs = {}
    heads = [state["weight"] for state in parsed.saved_modules.values() if "weight" in state]
    if task == "seq-cls" and heads:
        kwargs["num_labels"] = heads[-1].shape[0]
    model, tokenizer = load_model(base, task=task, **kwargs)
    before: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_adapter(model, adapter)
    merged = merge_and_unload(model)
    after = merged.state_dict()
    changed = [k for k, v in after.items() if k not in before or not torch.equal(v, before[k])]
    return Merged(model=merged, tokenizer=tokenizer, changed=changed)
