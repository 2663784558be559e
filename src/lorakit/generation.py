"""Text generation with a base model and any number of adapters: the Python API behind `lorakit generate`.

Prompts are generated in left-padded batches (every prompt ends at the same position, so ``generate``
continues each one); with several adapters loaded, each prompt picks its own and a batch mixes them
through ``lorakit.route_rows``, which equals running that prompt with its adapter merged.

>>> model, tok = lorakit.models.load_model("smollm2-135m")
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
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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

    from lorakit.adapters import route_rows

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
        model / tokenizer: from ``lorakit.models.load_model`` (adapters loaded with ``load_adapter``).
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


# -- `lorakit generate` -----------------------------------------------------------------------------------
def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="lorakit generate",
        description="Generate text with a base model and adapters. Prompts given as arguments stream to the "
        "terminal; without them, JSONL records ({\"prompt\"} or {\"messages\"}, optional \"adapter\") are read "
        "from --input or stdin (plain lines are prompts too) and one JSON line per record is written.",
    )
    p.add_argument("prompts", nargs="*", help="prompt text(s); omit to read --input / stdin")
    p.add_argument("--model", required=True, help="built-in name, local folder or hub id of the base")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter or run folder; repeat for several (each record names one in 'adapter')")
    p.add_argument("--default-adapter", metavar="NAME",
                   help="adapter for prompts that name none (default: the only one; 'base': no adapter)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to each prompt")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--input", metavar="FILE", help="JSONL file of records ('-': stdin)")
    p.add_argument("--output", metavar="FILE", help="write the JSONL results here (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: no beams)")
    p.add_argument("--sample", action="store_true", help="sample (with --temperature / --top-p) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=8, help="records per batch (JSONL mode)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p  # fmt: skip


def _adapter_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    from pathlib import Path

    specs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = ("default" if len(values) == 1 else Path(value).name.replace("-", "_")), value
        if not name.isidentifier() or name == "base":
            raise ConfigError(f"--adapter {value!r}: the name {name!r} must be an identifier other than 'base'")
        specs.append((name, path))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapter names must differ, got {names}; name them NAME=DIR")
    return specs


def load_for_generation(model_name: str, adapters: Sequence[tuple[str, str]], device: str = "auto"):
    """(model, tokenizer) with each ``(name, folder)`` adapter loaded under its name, unmerged.

    Args:
        model_name: built-in name, local folder or hub id.
        adapters: adapters to load; a single one may also be a non-LoRA trained state from `lorakit train`.
        device: auto, cpu or cuda.
    """
    from lorakit.files import load_adapter
    from lorakit.models import load_model
    from lorakit.training.distributed import pick_device
    from lorakit.training.outputs import load_trained

    model, tokenizer = load_model(model_name)
    if len(adapters) == 1 and adapters[0][0] == "default":
        load_trained(model, adapters[0][1])  # a LoRA adapter, or any method's trained state
    else:
        for name, path in adapters:
            load_adapter(model, path, name=name)
    return model.to(pick_device(device)).eval(), tokenizer


def _read_records(source: str | None, prompts: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) per input: positional prompts, or JSONL / plain lines from a file or stdin."""
    import json
    import sys
    from pathlib import Path

    if prompts:
        return [(f"argument {i + 1}", {"prompt": p}) for i, p in enumerate(prompts)]
    name = "stdin" if source in (None, "-") else str(source)
    if name != "stdin" and not Path(name).is_file():
        raise ConfigError(f"--input {name}: file not found")
    text = sys.stdin.read() if name == "stdin" else Path(name).read_text(encoding="utf-8")
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            out.append((f"{name}, line {lineno}", {"prompt": line}))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}, line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec.get("prompt"), str) and not isinstance(rec.get("messages"), list):
            raise ConfigError(f"{name}, line {lineno}: a record needs a 'prompt' string or a 'messages' list")
        out.append((f"{name}, line {lineno}", rec))
    if not out:
        raise ConfigError(f"no prompts: give them as arguments, in --input, or on stdin ({name} was empty)")
    return out


def _routes(records: Sequence[tuple[str, dict[str, Any]]], loaded: Sequence[str],
            default: str | None) -> list[str | None] | None:  # fmt: skip
    """The adapter of each record (None: the base model); None overall when every record uses the model as
    loaded (one adapter, active), so no routing is needed."""
    if default is None and len(loaded) == 1:
        default = loaded[0]
    routes: list[str | None] = []
    for where, rec in records:
        if "adapter" in rec:
            name = rec["adapter"]
        elif default is None and len(loaded) > 1:
            raise ConfigError(f"{where}: several adapters are loaded; name one in 'adapter' (or --default-adapter)")
        else:
            name = default
        if name not in (None, "base") and name not in loaded:
            raise ConfigError(f"{where}: unknown adapter {name!r}; loaded: {list(loaded)}")
        routes.append(None if name in (None, "base") else name)
    if len(loaded) <= 1 and all(r == (loaded[0] if loaded else None) for r in routes):
        return None
    return routes


def generate_main(argv: list[str]) -> int:
    """``lorakit generate``: see ``--help``."""
    import json
    import sys

    args = _parser().parse_args(argv)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                  do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)
    specs = _adapter_specs(args.adapter)
    records = _read_records(args.input, args.prompts)  # input errors before the model loads
    routes = _routes(records, [n for n, _ in specs], args.default_adapter)
    model, tokenizer = load_for_generation(args.model, specs, args.device)
    prompts = [encode_prompt(tokenizer, rec.get("messages") or rec["prompt"], chat=args.chat, system=args.system)
               for _, rec in records]  # fmt: skip
    common = dict(pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(model, tokenizer), settings=settings)
    torch.manual_seed(args.seed)
    if args.prompts:  # to the terminal: stream token by token when decoding allows it
        from transformers import TextStreamer

        for i, ids in enumerate(prompts):
            route = None if routes is None else [routes[i]]
            if args.num_beams == 1:
                streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                generate_ids(model, [ids], adapters=route, streamer=streamer, batch_size=1, **common)
            else:
                (new,) = generate_ids(model, [ids], adapters=route, batch_size=1, **common)
                print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
        return 0
    new = generate_ids(model, prompts, adapters=routes, batch_size=args.batch_size, progress=True, **common)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for (_, rec), ids in zip(records, new):
            out.write(json.dumps({**rec, "output": tokenizer.decode(ids, skip_special_tokens=True)}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
