"""Chat templates under control: rendering with one-line errors, a small registry of well-known templates,
and the start-up check that a trained assistant turn ends with a token that stops generation.

``--chat-template`` takes a registry name (``chatml``, ``llama-3``, ``mistral``, ``gemma``) or a Jinja file;
the chosen text replaces the tokenizer's own template for training and is saved beside the adapter
(``chat_template.jinja``) so that ``generate`` and ``serve`` render prompts the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.data.text import DataError

__all__ = [
    "CHAT_TEMPLATES",
    "CHAT_TEMPLATE_FILE",
    "apply_chat_template",
    "has_stop_token",
    "read_chat_template",
    "render_chat",
    "save_chat_template",
    "saved_chat_template",
    "template_supports_tools",
]

# The file a run writes beside its adapter when it trained with --chat-template.
CHAT_TEMPLATE_FILE = "chat_template.jinja"

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('mistral: unknown role ' + message['role']) }}{% endif %}{% endfor %}"
    ),
    # ChatML with tools in the style of Qwen2.5 and Hermes: definitions in the system turn, calls as
    # <tool_call> JSON, results as <tool_response> user turns.
    "chatml-tools": (
        "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ '# Tools\n\nYou may call one or more functions to "
        "assist with the user query.\n\n<tools>' }}{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
        "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags.<|im_end|>\n' }}{% elif messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{% elif message['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + "
        "'\n</tool_response><|im_end|>\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + "
        "message['content'] }}{% for call in message['tool_calls'] or [] %}"
        "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}{{ '<tool_call>\n' + "
        "({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson) + "
        "'\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('gemma: the template has no system role') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


def read_chat_template(value: str) -> str:
    """The Jinja text of ``--chat-template``: a registry name, else a file.

    Args:
        value: a name of ``CHAT_TEMPLATES`` or the path of a Jinja file.
    """
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise DataError(
            f"--chat-template {value!r} is neither a known template ({', '.join(CHAT_TEMPLATES)}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--chat-template {path}: cannot be read as UTF-8 text ({exc})") from exc
    if "messages" not in text:
        raise DataError(f"--chat-template {path}: not a chat template (it never reads 'messages')")
    return text


def apply_chat_template(tokenizer: Any, text: str | None) -> None:
    """Make ``text`` the tokenizer's chat template (None: keep the tokenizer's own).

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: Jinja text from :func:`read_chat_template`, or None.
    """
    if text is not None:
        tokenizer.chat_template = text


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template reads a ``tools`` list (tool definitions reach the prompt only then)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    generation_prompt: bool,
    source: str = "",
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The template's text for ``messages``; a template that raises (``raise_exception``), or fails to
    render, becomes one :class:`DataError` line carrying the template's own message.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: ``{"role", "content", ...}`` dicts.
        generation_prompt: append the assistant header.
        source: the record's file and line, for the message.
        tools: tool definitions passed to the template.
    """
    from jinja2 import TemplateError

    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt, **extra
        )
    except TemplateError as exc:
        where = f"{source}: " if source else ""
        raise DataError(f"{where}the chat template refused the conversation: {exc}") from exc


def has_stop_token(tokenizer: Any, target_ids: Sequence[int]) -> bool:
    """Whether a trained assistant turn holds the tokenizer's EOS, the token generation stops on
    (lorakit.generation.stop_token_ids); a turn without it teaches a model that never stops.

    Args:
        tokenizer: the tokenizer.
        target_ids: the token ids of the assistant turn as trained.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos is not None and int(eos) in set(target_ids)


def save_chat_template(folder: str | Path, text: str) -> Path:
    """Write ``text`` as ``folder/chat_template.jinja`` atomically (a temp file, then a rename).

    Args:
        folder: the adapter or run folder.
        text: the Jinja text the run trained with.
    """
    target = Path(folder) / CHAT_TEMPLATE_FILE
    tmp = target.with_name(f".{CHAT_TEMPLATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def saved_chat_template(folders: Sequence[str | Path]) -> str | None:
    """The chat template the adapters in ``folders`` were trained with (None: none saved one); adapters
    trained with different templates cannot share one tokenizer and are refused.

    Args:
        folders: adapter or run folders.
    """
    texts = {}
    for folder in folders:
        path = Path(folder) / CHAT_TEMPLATE_FILE
        if path.is_file():
            texts[str(folder)] = path.read_text(encoding="utf-8")
    if len(set(texts.values())) > 1:
        raise DataError(f"adapters {sorted(texts)} were trained with different chat templates; load them apart")
    return next(iter(texts.values()), None)
