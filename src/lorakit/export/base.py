"""The base an export is for: its name, transformers config, llama.cpp layout and (when known) GGUF file,
checked against the fingerprint the adapter recorded when it was saved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from lorakit.errors import ExportError
from lorakit.io.bases import base_for
from lorakit.io.files import AdapterFile
from lorakit.io.models import builtin_gguf, model_path
from lorakit.io.outputs import claim_file, starts_with

GGUF_MAGIC = b"GGUF"


def claim_gguf(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``--overwrite`` was given and it is a GGUF file (one an export
    could have written), so no other file is ever replaced.

    Args:
        out: the output file.
        overwrite: whether replacing it was asked for.
    """
    claim_file(out, overwrite=overwrite, owned=lambda path: starts_with(path, GGUF_MAGIC), what="a GGUF file")


@dataclass(frozen=True)
class Base:
    """One base model as the export sees it."""

    name: str  # built-in name, folder or hub id, as load_model takes it
    config: Any  # transformers.PretrainedConfig
    gguf_path: Path | None  # the GGUF it came from (built-ins) or --base-gguf


def resolve_base(parsed: AdapterFile, adapter: Path, model: str | None, base_gguf: Path | None) -> Base:
    """Find the base, load its config and refuse one the adapter was not trained on.

    Args:
        parsed: the adapter.
        adapter: its folder.
        model: ``--model`` or None (the built-in or local base the adapter names).
        base_gguf: ``--base-gguf`` or None (the built-in's own file, if any).
    """
    from transformers import AutoConfig

    name = base_for(model, [adapter])
    config = AutoConfig.from_pretrained(model_path(name))
    check_fingerprint(parsed, config, name)
    path = base_gguf or builtin_gguf(name)
    if path is not None:
        if not Path(path).is_file():
            raise ExportError(f"--base-gguf {path}: no such file")
        check_gguf_matches(Path(path), config)
    return Base(name=name, config=config, gguf_path=Path(path) if path else None)


def check_fingerprint(parsed: AdapterFile, config: Any, name: str) -> None:
    """Refuse a base whose type or size differs from the one the adapter recorded (lorakit files only).

    Args:
        parsed: the adapter.
        config: the base's transformers config.
        name: the base's name, for the message.
    """
    recorded = (parsed.raw_config.get("lorakit") or {}).get("base_model") or {}
    actual = {"model_type": config.model_type, "hidden_size": getattr(config, "hidden_size", None),
              "num_hidden_layers": getattr(config, "num_hidden_layers", None)}
    for key, value in actual.items():
        if recorded.get(key) is not None and recorded[key] != value:
            raise ExportError(f"the adapter was trained on a base with {key}={recorded[key]!r}, "
                              f"but {name} has {key}={value!r}")


def check_gguf_matches(path: Path, config: Any) -> None:
    """Refuse a GGUF of another architecture, depth, width or vocabulary than the transformers base.

    Args:
        path: the base GGUF.
        config: the base's transformers config.
    """
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    expected = {
        f"{arch}.block_count": getattr(config, "num_hidden_layers", None),
        f"{arch}.embedding_length": getattr(config, "hidden_size", None),
    }
    if arch != config.model_type:
        raise ExportError(f"{path}: a {arch!r} GGUF, but the base is {config.model_type!r}")
    for key, value in expected.items():
        if _field(reader, key) != value:
            raise ExportError(f"{path}: {key}={_field(reader, key)!r}, but the base has {value!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else None
    if vocab is not None and vocab != config.vocab_size:
        raise ExportError(f"{path}: a vocabulary of {vocab} tokens, but the base has {config.vocab_size}")


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()
