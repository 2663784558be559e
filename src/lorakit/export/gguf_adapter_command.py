"""Run ``--format gguf-adapter``: resolve the base, refuse what llama.cpp cannot hold, write atomically."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from lorakit.errors import ExportError
from lorakit.export import ExportRequest
from lorakit.export.base import claim_gguf, resolve_base
from lorakit.export.gguf_adapter import ADAPTER_DTYPES, check_exportable, write_gguf_adapter
from lorakit.export.llama_cpp_names import layout_of
from lorakit.io.files import CONFIG_NAME, read_adapter
from lorakit.io.outputs import write_file_atomically
from lorakit.methods.io import CONFIG_NAME as METHOD_CONFIG


def refuse_other_methods(adapter: Path) -> None:
    """One line for a folder holding a non-LoRA method (prefix tuning, bottleneck adapters, BitFit...).

    Args:
        adapter: the ``--adapter`` folder.
    """
    config = adapter / METHOD_CONFIG
    if config.is_file() and not (adapter / CONFIG_NAME).is_file():
        try:
            method = json.loads(config.read_text()).get("method", "a non-LoRA method")
        except (OSError, ValueError, AttributeError):
            method = "a non-LoRA method"
        raise ExportError(f"{adapter} holds {method} weights, not LoRA: llama.cpp adapters are LoRA A/B "
                          "pairs only")


def export_gguf_adapter(request: ExportRequest) -> list[str]:
    """Write ``request.adapter`` as a llama.cpp GGUF LoRA file at ``request.out``.

    Args:
        request: the parsed command line.

    Returns:
        The lines to print.
    """
    dtype = request.dtype or ADAPTER_DTYPES[0]
    claim_gguf(request.out, request.overwrite)
    refuse_other_methods(request.adapter)
    parsed = read_adapter(request.adapter)
    check_exportable(parsed, None)  # base-independent reasons first: no model needs loading to refuse them
    base = resolve_base(parsed, request.adapter, request.model, request.base_gguf)
    layout = layout_of(base.config)
    names = None
    if base.gguf_path is not None:
        names = {t.name for t in gguf.GGUFReader(base.gguf_path).tensors}
    check_exportable(parsed, layout, names)
    summary: dict[str, float] = {}
    write_file_atomically(request.out, lambda tmp: summary.update(write_gguf_adapter(tmp, parsed, layout, dtype)))
    lines = [f"wrote {request.out}: llama.cpp LoRA adapter, {summary['tensors']} tensors ({dtype}), "
             f"adapter.lora.alpha={summary['alpha']:g}, for base {base.name}"]
    if base.gguf_path is not None:
        lines.append(f"run: llama-server -m {base.gguf_path} --lora {request.out}")
    return lines
