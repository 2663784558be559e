"""An Ollama ``Modelfile`` for a merged GGUF: ``FROM`` the file, the chat template's stop tokens as
``PARAMETER stop``, and a ``TEMPLATE`` (Go template syntax) plus ``SYSTEM`` for ChatML chat templates,
which Ollama does not take from the GGUF's Jinja template on its own.

Ollama itself is not installed here; the text is checked by tests, not by Ollama.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def stop_tokens(template: str, tokens: list[str], eos: str | None) -> list[str]:
    """The special tokens a chat template writes (``<|...|>`` that are in the vocabulary), plus EOS.

    Args:
        template: the Jinja chat template.
        tokens: the vocabulary.
        eos: the EOS token's text, if any.
    """
    vocab = set(tokens)
    found = [t for t in dict.fromkeys(_SPECIAL.findall(template)) if t in vocab]
    if eos and eos not in found:
        found.append(eos)
    return found


def modelfile_text(gguf_path: Path, reader: gguf.GGUFReader) -> str:
    """The Modelfile for ``gguf_path`` (named relative to the Modelfile, which sits beside it).

    Args:
        gguf_path: the merged GGUF.
        reader: that file, opened.
    """
    template = str(_field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE) or "")
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents()) if "tokenizer.ggml.tokens" in reader.fields else []
    eos_id = _field(reader, gguf.Keys.Tokenizer.EOS_ID)
    eos = tokens[int(eos_id)] if eos_id is not None and int(eos_id) < len(tokens) else None
    lines = [f"FROM ./{gguf_path.name}", ""]
    if "<|im_start|>" in template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""']
        if (system := _DEFAULT_SYSTEM.search(template)) is not None:
            lines += [f'SYSTEM """{system.group(1)}"""']
        lines.append("")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(template, tokens, eos)]
    return "\n".join(lines) + "\n"
