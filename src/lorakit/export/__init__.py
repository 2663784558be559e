"""``lorakit export``: an adapter (or the model it merges into) in the formats other runtimes load.

Formats are registered here by name; each names the function that writes it, so the command imports only
the writer it runs. Runtime verdicts (which runtime can serve an adapter file, and why not) live in
:mod:`lorakit.export.runtimes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExportRequest:
    """What the user asked ``lorakit export`` for."""

    adapter: Path
    out: Path
    model: str | None = None  # None: the built-in base the adapter names
    dtype: str | None = None  # None: the format's default
    base_gguf: Path | None = None  # the base's GGUF, when it is not a built-in's own file
    overwrite: bool = False
    requantize: bool = False  # --format gguf: re-encode every tensor in dtype, not only the changed ones


@dataclass(frozen=True)
class ExportFormat:
    """One output format: the writer (``module:function`` taking an :class:`ExportRequest` and returning
    the lines to print), its dtypes (the first is the default unless the writer derives one) and help."""

    writer: str
    dtypes: tuple[str, ...]
    help: str


FORMATS: dict[str, ExportFormat] = {
    "gguf-adapter": ExportFormat(
        "lorakit.export.gguf_adapter_command:export_gguf_adapter", ("f32", "f16", "bf16"),
        "a LoRA adapter for llama.cpp (`llama-server -m BASE.gguf --lora FILE`), the base stays as it is"),
    "gguf": ExportFormat(
        "lorakit.export.gguf_model:export_gguf_model", ("f16", "f32", "bf16", "q8_0"),
        "the merged model as one GGUF file (llama.cpp, Ollama) plus an Ollama Modelfile beside it"),
    "hf": ExportFormat(
        "lorakit.export.hf:export_hf", ("fp32", "bf16", "fp16"),
        "the merged model as a transformers folder of safetensors shards (default dtype: the base's own)"),
}
