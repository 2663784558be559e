"""Text generation with a base model and any number of adapters: the Python API behind `lorakit generate`
(the command itself is ``lorakit.cli.generate``, which sits above training and loads trained states).

Prompts are generated in left-padded batches (every prompt ends at the same position, so ``generate``
continues each one); with several adapters loaded, each prompt picks its own and a batch mixes them
through ``lorakit.route_rows``, which equals running that prompt with its adapter merged.

>>> model, tok = lorakit.io.models.load_model("smollm2-135m")
>>> lorakit.load_adapter(model, "runs/sft", name="sft")
>>> lorakit.generate(model, tok, ["What is LoRA?"], adapters=["sft"], chat=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.data.chat_templates import render_chat
from lorakit.errors import ConfigError

__all__ = ["GenerationSettings", "encode_prompt", "generate", "generate_ids", "stop_token_ids"]


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy (default), sampling (``do_sample`` with temperature/top-p) or beam search."""

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ConfigError("max_new_tokens and num_beams must be >= 1")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                               "do_sample": self.do_sample, "no_repeat_ngram_size": self.no_repeat_ngram_size}
        if self.num_beams > 1:
            out.update(length_penalty=self.length_penalty, early_stopping=True)
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=0)  # top_k=0: top-p alone
        return out


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and any the model's generation config names."""
    ids = [getattr(tokenizer, "eos_token_id", None)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def encode_prompt(tokenizer: Any, prompt: str | Sequence[dict[str, str]], chat: bool = False,
                  system: str | None = None) -> list[int]:  # fmt: skip
    """Token ids of a prompt: the text as is, or (``chat``) a user turn, or a message list, rendered with
    the tokenizer's chat template and the assistant header appended. No special tokens are added beyond
    the template's, exactly as the SFT and E2E training encoders build their inputs.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: text, or a list of ``{"role", "content"}`` messages (implies ``chat``).
        chat: render with the chat template.
        system: an optional system message put first (chat only).
    """
    if not isinstance(prompt, str) or chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat needs a tokenizer with a chat template; this one has none")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        prompt = render_chat(tokenizer, messages, generation_prompt=True)  # a raising template: one line
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _cut(row: list[int], stop: Sequence[int]) -> list[int]:
    ends = [row.index(s) for s in stop if s in row]
    return row[: min(ends)] if ends else row


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    settings: GenerationSettings | None = None,
    adapters: Sequence[str | None] | None = None,
    batch_size: int = 8,
    streamer: Any = None,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt, cut before the first stop token.

    Args:
        model: a causal LM (adapters loaded, unmerged, when ``adapters`` routes rows).
        prompts: token ids per prompt.
        pad_id / stop_ids: the padding id and the ids that end a generation.
        settings: decoding settings.
        adapters: one adapter name per prompt (None: the base model); rows of a batch may differ.
        batch_size: prompts per ``generate`` call.
        streamer: a transformers streamer (only with one prompt and no beams).
        progress: show a progress bar over batches.
    """
    from tqdm.auto import tqdm

    from lorakit.lora.adapters import route_rows

    settings = settings or GenerationSettings()
    if adapters is not None and len(adapters) != len(prompts):
        raise ConfigError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for idx in tqdm(list(_batches(len(prompts), batch_size)), desc="generate", disable=not progress,
                        leave=False):  # fmt: skip
            ids, mask = _left_pad([prompts[i] for i in idx], pad_id)
            routing = route_rows(model, [adapters[i] for i in idx]) if adapters is not None else nullcontext()
            with routing:
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_id,
                    eos_token_id=list(stop_ids), use_cache=True, streamer=streamer, **settings.kwargs(),
                )  # fmt: skip
            out += [_cut(row, stop_ids) for row in generated[:, ids.shape[1] :].tolist()]
    finally:
        model.train(was_training)
    return out


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    *,
    adapters: Sequence[str | None] | str | None = None,
    chat: bool = False,
    system: str | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    **decoding: Any,
) -> list[str]:
    """Generate a continuation (or, with ``chat``, a reply) for each prompt.

    Args:
        model / tokenizer: from ``lorakit.io.models.load_model`` (adapters loaded with ``load_adapter``).
        prompts: texts, or message lists (rendered with the chat template).
        adapters: an adapter name for every prompt, one name for all, or None (the model as it is).
        chat / system: apply the chat template, with an optional system message.
        settings: decoding settings; or pass their fields (``num_beams=4``, ``do_sample=True``...).
        batch_size: prompts per batch.
    """
    settings = settings or GenerationSettings(**decoding)
    if isinstance(adapters, str):
        adapters = [adapters] * len(prompts)
    ids = [encode_prompt(tokenizer, p, chat=chat, system=system) for p in prompts]
    new = generate_ids(model, ids, pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(model, tokenizer),
                       settings=settings, adapters=adapters, batch_size=batch_size)  # fmt: skip
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]
