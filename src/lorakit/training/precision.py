"""The dtype a frozen base is held in (``base_dtype``), with what training updates kept in fp32.

A 16-bit base halves the memory its weights take. What the optimizer updates stays fp32, as PEFT's
``autocast_adapter_dtype`` keeps it: LoRA's A and B are created in fp32 and cast the layer input to their own
dtype; any other trainable tensor (a task head, a method's own parameters) is cast up here, and its module
gets its inputs in fp32 and gives its output back in the dtype it was called with. The loss is computed on
fp32 logits (``evaluate.loss_sum``), and merging adds ΔW in fp32 before rounding once to the base's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(name: str | None, device: str = "auto") -> torch.dtype:
    """The dtype to load a base in: ``name``'s, else bf16 on CUDA and fp32 elsewhere (CPUs without AMX run
    bf16 matmuls slower than fp32, docs/performance.md).

    Args:
        name: ``fp32``, ``bf16``, ``fp16`` or None (the device's default).
        device: the run's device setting (``auto``, ``cpu`` or ``cuda``).
    """
    if name is not None:
        return DTYPES[name]
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.bfloat16 if cuda else torch.float32


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _fp32_in(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    floats = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()]
    module._lorakit_caller_dtype = floats[0].dtype if floats else None  # type: ignore[assignment]
    return _cast_floats(args, torch.float32), _cast_floats(kwargs, torch.float32)


def _caller_dtype_out(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    dtype = getattr(module, "_lorakit_caller_dtype", None)
    return output if dtype is None or dtype == torch.float32 else _cast_floats(output, dtype)


def keep_trainable_fp32(model: nn.Module) -> int:
    """Cast every trainable parameter held in 16 bits to fp32, and let its module run in fp32 between
    16-bit neighbours; returns the number of modules changed.

    Args:
        model: a model whose method has been applied (``requires_grad`` marks what trains).
    """
    changed = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        if not own:
            continue
        for p in own:
            p.data = p.data.float()
        # Frozen tensors of the same module (a bias beside a trained weight) join it in fp32.
        for p in module.parameters(recurse=False):
            p.data = p.data.float()
        module.register_forward_pre_hook(_fp32_in, with_kwargs=True)
        module.register_forward_hook(_caller_dtype_out, with_kwargs=True)
        changed += 1
    return changed
