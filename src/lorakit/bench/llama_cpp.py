"""llama.cpp's ``llama-server`` as a side of `lorakit bench serve`, on the same prompts and adapters.

The adapters are lorakit's own, exported with ``lorakit export --format gguf-adapter``; the server loads
all of them at start (``--lora FILE`` repeated, ``--lora-init-without-apply``) and each request names its
one adapter (``"lora": [{"id": i, "scale": 1}]``), as llama.cpp's tools/server/README.md describes. Two
bases: the model exported to F32 GGUF (lorakit's fp32 weights) and the Q4_1 GGUF the built-in ships as.
The prompts go as the token ids lorakit's tokenizer gives, so both servers see the same tokens.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lorakit.bench.load import LoopbackServer, median_row, post_stream, print_cell, timed_cell, warm_up

CACHE_ENV = "LORAKIT_LLAMA_CPP_CACHE"
CTX_PER_SLOT = 256  # prompt (under 64 tokens) + 64 new tokens, with room


def llama_cpp_cache() -> Path:
    """Where scripts/llama_cpp.sh builds llama.cpp (``$LORAKIT_LLAMA_CPP_CACHE`` or ~/.cache/lorakit/llama.cpp)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorakit" / "llama.cpp")


def default_server_path() -> Path:
    """The llama-server binary scripts/llama_cpp.sh links into its cache."""
    return llama_cpp_cache() / "bin" / "llama-server"


def skip_reason(binary: Path) -> str | None:
    """Why the llama.cpp side cannot run, or None when ``binary`` is an executable file.

    Args:
        binary: the llama-server to run.
    """
    if not binary.is_file():
        return f"llama-server not built ({binary} missing): run scripts/llama_cpp.sh, or pass --llama-server PATH"
    if not os.access(binary, os.X_OK):
        return f"llama-server at {binary} is not executable"
    return None


def server_command(binary: Path, model: Path, loras: list[Path], port: int, parallel: int,
                   threads: int) -> list[str]:
    """llama-server on 127.0.0.1 with every adapter loaded at scale 0 (requests pick theirs).

    Args:
        binary: the llama-server executable.
        model: the base GGUF.
        loras: GGUF LoRA adapters; adapter ``i`` is ``{"id": i}`` in requests.
        port: the loopback port.
        parallel: slots (``-np``), the most requests decoded together.
        threads: CPU threads (``-t``).
    """
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-t", str(threads), "-c", str(parallel * CTX_PER_SLOT)]
    for lora in loras:
        cmd += ["--lora", str(lora)]
    return [*cmd, "--lora-init-without-apply"] if loras else cmd


def completion_body(prompt_ids: list[int], max_tokens: int, lora_id: int | None) -> dict[str, Any]:
    """A streamed, greedy ``/completion`` request with one adapter at scale 1 (unlisted adapters get 0).

    Args:
        prompt_ids: the prompt's token ids.
        max_tokens: new tokens at most (ends earlier at EOS, as lorakit serve does).
        lora_id: the adapter's index in the server's ``--lora`` list; None for the base alone.
    """
    body: dict[str, Any] = {"prompt": prompt_ids, "n_predict": max_tokens, "temperature": 0, "stream": True,
                            "cache_prompt": False}
    body["lora"] = [] if lora_id is None else [{"id": lora_id, "scale": 1.0}]
    return body


def read_event(line: str) -> dict[str, Any] | None:
    """One server-sent event line of a streamed ``/completion``: its JSON, or None for blank lines.

    Args:
        line: the line, decoded and stripped.

    Raises:
        RuntimeError: on an ``error:`` event.
    """
    if line.startswith("error:"):
        raise RuntimeError(f"llama-server: {line[6:].strip()[:300]}")
    if not line.startswith("data: "):
        return None
    return json.loads(line[6:])


def one_completion(port: int, body: dict[str, Any]) -> tuple[float, float, int]:
    """(latency s, time to first token s, generated tokens) of one streamed ``/completion``.

    Args:
        port: llama-server's loopback port.
        body: from :func:`completion_body`.
    """
    start, ttft, tokens = time.perf_counter(), None, 0
    for line in post_stream(port, "/completion", body, "llama-server"):
        event = read_event(line)
        if event is None:
            continue
        if ttft is None and (event.get("tokens") or event.get("content")):
            ttft = time.perf_counter() - start
        if event.get("stop"):
            tokens = int(event["tokens_predicted"])
    latency = time.perf_counter() - start
    return latency, ttft if ttft is not None else latency, tokens


def export_inputs(adapter_files: dict[str, str], folder: Path, model: str) -> tuple[list[Path], dict[str, Path]]:
    """The adapters as GGUF LoRA files (``lorakit export``) and the two base GGUFs: {label: file}.

    Args:
        adapter_files: adapter name -> lorakit adapter folder, in id order.
        folder: where to write the GGUF files.
        model: the built-in base the adapters were trained on.
    """
    from lorakit.export import ExportRequest
    from lorakit.export.gguf_adapter_command import export_gguf_adapter
    from lorakit.export.gguf_model import write_gguf_model
    from lorakit.io.models import builtin_gguf

    loras = []
    for name, path in adapter_files.items():
        out = folder / f"{name}.gguf"
        export_gguf_adapter(ExportRequest(adapter=Path(path), out=out, model=model))
        loras.append(out)
    shipped = builtin_gguf(model)
    f32 = folder / "base-f32.gguf"
    write_gguf_model(f32, shipped, {}, "f32", requantize=True)
    return loras, {"F32 base": f32, f"{_gguf_type(shipped)} base (shipped)": shipped}


def _gguf_type(path: Path) -> str:
    """The name of a GGUF's file type (``general.file_type``), e.g. Q4_1."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "GGUF"
    return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")


def llama_cpp_rows(binary: Path, loras: list[Path], bases: dict[str, Path], prompt_ids: list[list[int]],
                   counts: list[int], concurrency: int, args: Any) -> list[dict[str, Any]]:
    """Every base × adapter count at one concurrency, ``args.repeats`` runs each, as report rows.

    Args:
        binary: llama-server.
        loras: the GGUF adapters (``counts`` may not exceed their number).
        bases: label -> base GGUF.
        prompt_ids: the prompts' token ids.
        counts: distinct adapters per cell; request ``i`` uses adapter ``i % count``.
        concurrency: closed-loop clients, and the server's slots.
        args: ``lorakit bench serve``'s flags (``port``, ``rounds``, ``repeats``, ``max_tokens``, ``threads``).
    """
    n = max(concurrency * args.rounds, 4)
    rows = []
    for label, model in bases.items():
        server = LoopbackServer(server_command(binary, model, loras[:max(counts)], args.port, concurrency,
                                               args.llama_threads), args.port, "llama-server")
        print(f"llama.cpp llama-server, {label} ({model.name}):", flush=True)
        try:
            server.wait_ready()
            burst = [completion_body(prompt_ids[i % len(prompt_ids)], 8, i % max(counts)) for i in range(concurrency)]
            warm_up(lambda b: one_completion(args.port, b), burst, concurrency)
            runs: dict[int, list[dict]] = {count: [] for count in counts}
            for _ in range(args.repeats):
                for count in counts:
                    runs[count].append(llama_cpp_cell(server, prompt_ids, count, n, concurrency, args.max_tokens))
        finally:
            server.stop()
        rows += [{**median_row(runs[count]), "system": f"llama.cpp, {label}"} for count in counts]
    return rows


def llama_cpp_cell(server: LoopbackServer, prompt_ids: list[list[int]], count: int, n: int, concurrency: int,
                   max_tokens: int) -> dict[str, Any]:
    """One timed closed-loop cell against a running llama-server, printed; request ``i`` uses adapter ``i % count``.

    Args:
        server: the running llama-server.
        prompt_ids: the prompts' token ids.
        count: distinct adapters.
        n: requests.
        concurrency: closed-loop clients.
        max_tokens: new tokens per request.
    """
    bodies = [completion_body(prompt_ids[i % len(prompt_ids)], max_tokens, i % count) for i in range(n)]
    row = timed_cell(server, lambda b: one_completion(server.port, b), bodies, concurrency)
    row.update(adapters=count, concurrency=concurrency)
    print_cell(row)
    return row
