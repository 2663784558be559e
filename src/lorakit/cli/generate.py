"""`lorakit generate`: the command over ``lorakit.generation`` (parsing, loading adapters or trained states,
reading records, streaming). An application module: it may import training, the library may not.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.cli.common import adapter_specs, add_adapters, add_device, add_model, add_seed
from lorakit.data.chat_templates import apply_chat_template, read_chat_template
from lorakit.errors import ConfigError
from lorakit.generation import GenerationSettings, encode_prompt, generate_ids, stop_token_ids
from lorakit.io.bases import base_for


# -- `lorakit generate` -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakit generate",
        description="Generate text with a base model and adapters. Prompts given as arguments stream to the "
        "terminal; without them, JSONL records ({\"prompt\"} or {\"messages\"}, optional \"adapter\") are read "
        "from --input or stdin (plain lines are prompts too) and one JSON line per record is written.",
    )
    p.add_argument("prompts", nargs="*", help="prompt text(s); omit to read --input / stdin")
    add_model(p, help_="built-in name, local folder or hub id of the base (default: the built-in or local base "
              "the adapters name)")
    add_adapters(p, metavar="[NAME=]DIR",
                 help_="adapter or run folder; repeat for several (each record names one in 'adapter')")
    p.add_argument("--default-adapter", metavar="NAME",
                   help="adapter for prompts that name none (default: the only one; 'base': no adapter)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to each prompt")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="chat template for --chat (chatml, llama-3, mistral, gemma or a Jinja file; default: the "
                   "one the adapter was trained with, else the tokenizer's)")
    p.add_argument("--input", metavar="FILE", help="JSONL file of records ('-': stdin)")
    p.add_argument("--output", metavar="FILE", help="write the JSONL results here (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: no beams)")
    p.add_argument("--sample", action="store_true", help="sample (with --temperature / --top-p) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    add_seed(p, help_="seed for sampling")
    p.add_argument("--batch-size", type=int, default=8, help="records per batch (JSONL mode)")
    add_device(p)
    return p  # fmt: skip


def load_for_generation(model_name: str, adapters: Sequence[tuple[str, str]], device: str = "auto"):
    """(model, tokenizer) with each ``(name, folder)`` adapter loaded under its name, unmerged.

    Args:
        model_name: built-in name, local folder or hub id.
        adapters: adapters to load; a single one may also be a non-LoRA trained state from `lorakit train`.
        device: auto, cpu or cuda.
    """
    from lorakit.data.chat_templates import apply_chat_template, saved_chat_template
    from lorakit.io.files import load_adapter
    from lorakit.io.models import load_model
    from lorakit.training.distributed import pick_device
    from lorakit.training.outputs import load_trained

    model, tokenizer = load_model(model_name)
    apply_chat_template(tokenizer, saved_chat_template([path for _, path in adapters]))
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
    specs = adapter_specs(args.adapter)
    records = _read_records(args.input, args.prompts)  # input errors before the model loads
    routes = _routes(records, [n for n, _ in specs], args.default_adapter)
    template = read_chat_template(args.chat_template) if args.chat_template else None
    model, tokenizer = load_for_generation(base_for(args.model, [d for _, d in specs]), specs, args.device)
    apply_chat_template(tokenizer, template)
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
