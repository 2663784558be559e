"""Loading a model with its frozen linear layers quantized one at a time (QLoRA without the fp32 peak).

``load_model`` + ``quantize_base`` holds the whole fp32 base before quantizing it: on SmolLM2-135M the
process peaks at ~1.5 GiB to end with ~0.7 GiB. Here the model is built uninitialised (transformers'
``no_init_weights``: its fp32 buffers are allocated but never touched, so the OS never backs them), each
linear's weight is read from the safetensors file just before it is quantized, and everything else is read
after. Each read opens the file anew, so the mapped pages of one tensor are released before the next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lorakit.errors import LorakitError
from lorakit.io.models import (
    TASK_CLASSES,
    _check_local_model,
    finish_loaded,
    load_tokenizer,
    model_path,
    quiet_transformers,
)
from lorakit.quant.heap import trim_heap
from lorakit.quant.linear import QuantizationReport, quantize_base

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 16 * 2**20


def weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key → the safetensors file holding it (a single file, or a sharded one's index).

    Args:
        folder: a model folder.

    Raises:
        LorakitError: the folder holds no safetensors checkpoint (pickled ``.bin`` files are never read).
    """
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, "pt") as f:
            return dict.fromkeys(f.keys(), folder / SINGLE_FILE)
    raise LorakitError(f"{folder} holds no {SINGLE_FILE} or {INDEX_FILE}: cannot load it quantized layer by layer")


def read_tensor(files: dict[str, Path], key: str, shape: torch.Size) -> torch.Tensor:
    """One tensor, fp32, in memory of its own (the file's mapping is closed before returning).

    Args:
        files: from :func:`weight_files`.
        key: the checkpoint key.
        shape: the shape the model expects.

    Raises:
        LorakitError: the file's tensor has another shape.
    """
    with safe_open(files[key], "pt") as f:
        _check_shape(key, f.get_slice(key).get_shape(), shape)
        return f.get_tensor(key).to(torch.float32).clone()


def _check_shape(key: str, found: Sequence[int], expected: torch.Size) -> None:
    if tuple(found) != tuple(expected):
        raise LorakitError(f"checkpoint tensor {key} has shape {tuple(found)}, the model expects {tuple(expected)}")


def copy_from_file(file: Path, key: str, dest: torch.Tensor) -> None:
    """Copy one checkpoint tensor into ``dest`` a few MiB at a time, each slice from a fresh mapping, so the
    file's pages never add a second copy of a big tensor (the 108 MiB embedding) to the process.

    Args:
        file: the safetensors file.
        key: the tensor's key.
        dest: the model's tensor, of the checkpoint's shape.
    """
    with safe_open(file, "pt") as f:
        _check_shape(key, f.get_slice(key).get_shape(), dest.shape)  # copy_ would broadcast a wrong one
        if dest.dim() == 0 or dest.numel() * dest.element_size() <= CHUNK_BYTES:
            dest.copy_(f.get_tensor(key))
            return
    rows = max(1, CHUNK_BYTES // (dest[0].numel() * dest.element_size()))
    for start in range(0, dest.shape[0], rows):
        with safe_open(file, "pt") as f:
            dest[start : start + rows].copy_(f.get_slice(key)[start : start + rows])


def _filler(files: dict[str, Path]):
    """``fill(name, linear)`` for :func:`quantize_base`: the layer's weight and bias from the file."""

    def fill(name: str, linear: nn.Linear) -> None:
        trim_heap()  # the previous layer's fp32 weight and quantizer scratch lower the peak (docs/quantization.md)
        with torch.no_grad():
            weight = read_tensor(files, f"{name}.weight", linear.weight.shape)
            linear.weight.data = weight  # the never-touched empty one is freed
            if linear.bias is not None:
                linear.bias.data = read_tensor(files, f"{name}.bias", linear.bias.shape)

    return fill


def _load_remaining(model: nn.Module, files: dict[str, Path], quantized: Sequence[str]) -> list[str]:
    """Every parameter and persistent buffer of the layers not quantized, from the file; returns the keys
    it lacks. Tied parameters are one object under two keys: loading either fills both.
    """
    seen: set[int] = set()
    done = set(quantized)
    missing = []
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if id(value) in seen or key.rpartition(".")[0] in done:
                continue
            if key not in files:
                missing.append(key)
                continue
            copy_from_file(files[key], key, value)
            seen.add(id(value))
    return missing


def _untied_missing(model: nn.Module, missing: list[str]) -> list[str]:
    """The missing keys that tying does not fill (a tied output head is the input embedding itself)."""
    state = model.state_dict(keep_vars=True)
    filled = {id(v) for k, v in state.items() if k not in missing}
    return [k for k in missing if id(state[k]) not in filled]


def load_quantized(
    name_or_path: str | Path,
    scheme: str = "nf4",
    task: str = "causal-lm",
    *,
    skip: Sequence[str] = (),
    include_head: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, object, QuantizationReport]:
    """(model, tokenizer, report): like ``load_model`` then ``quantize_base``, without the fp32 peak.

    Args:
        name_or_path: a built-in name, local folder or hub id (its checkpoint must be safetensors).
        scheme: ``"nf4"`` or ``"int8"``.
        task: ``"causal-lm"`` or ``"base"``; a task with a new head (``"seq-cls"``) needs ``load_model``.
        skip: module-name patterns kept dense, as for :func:`quantize_base`.
        include_head: quantize the output head too.
        **kwargs: config overrides for ``AutoConfig.from_pretrained``.

    Raises:
        LorakitError: no safetensors checkpoint, a task with a new head, or weights missing from the file.
    """
    import transformers
    from transformers.initialization import no_init_weights

    if task not in TASK_CLASSES or task == "seq-cls":
        raise LorakitError(f"load_quantized loads 'causal-lm' or 'base' models, not {task!r}")
    path = model_path(name_or_path)
    _check_local_model(path)
    files = weight_files(Path(path))
    tokenizer = load_tokenizer(path)
    config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    with quiet_transformers(), no_init_weights():
        model = getattr(transformers, TASK_CLASSES[task]).from_config(config, dtype=torch.float32)
    model.tie_weights()
    report = quantize_base(model, scheme, skip=skip, include_head=include_head, fill=_filler(files))
    missing = _untied_missing(model, _load_remaining(model, files, report.layers))
    if missing:
        raise LorakitError(f"{name_or_path}: the checkpoint lacks {', '.join(missing[:5])}: load it with load_model")
    trim_heap()
    finish_loaded(model, tokenizer, name_or_path)
    model.eval()
    return model, tokenizer, report
