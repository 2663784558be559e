"""`lorakit bench serve`: a closed-loop load generator against `lorakit serve` on loopback.

Starts `lorakit serve` as a subprocess on smollm2-135m with N random rank-8 q,v adapters (as costly as
trained ones), sends E2E meaning representations as streamed completions from C closed-loop clients (each
sends its next request when the previous one ends), and records generated tokens/s, p50/p99 latency and
time to first token. Baselines in the same run: (a) the server with batching off (one request at a time,
adapter switched per request) and (b) PEFT's batched ``generate(adapter_names=...)`` on the same requests.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.bench.load import (
    LoopbackServer,
    median_row,
    post_stream,
    print_cell,
    summarize,
    timed_cell,
    warm_up,
)

MODEL = "smollm2-135m"
LLAMA_CPP_F32 = "llama.cpp, F32 base"  # the llama.cpp row on the same fp32 weights lorakit serves
PAIRED = ("lorakit serve, paired", "llama.cpp, F32 base, paired")  # both servers up, cells alternating
BATCHING_OFF = "(a) batching off"
PREFILL_ALONE = "(c) prefill one at a time"
SERVER_VARIANTS = {PREFILL_ALONE: ("--max-prefill-tokens", "1"), "(d) plain fp32 weights": ("--no-pack-weights",)}


def e2e_prompts(path: Path, n: int) -> list[str]:
    """The first ``n`` distinct meaning representations of E2E's valid.txt, as ``lorakit train --task e2e``
    formats them."""
    from lorakit.data.e2e import e2e_prompt

    seen: dict[str, None] = {}
    for line in path.read_text().splitlines():
        mr = line.split("||")[0].strip()
        if mr:
            seen.setdefault(mr, None)
        if len(seen) >= n:
            break
    return [e2e_prompt(mr) for mr in seen]


def write_adapters(folder: Path, count: int) -> dict[str, str]:
    """``count`` random rank-8 q,v adapters for smollm2-135m as files: {name: dir}."""
    import torch

    import lorakit
    from lorakit.io.models import load_model

    model, _ = load_model(MODEL)
    out = {}
    for i in range(count):
        name = f"task{i}"
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=("q", "v")), name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        out[name] = str(lorakit.save_adapter(model, folder / name, name))
    return out


class ServerProcess(LoopbackServer):
    """`lorakit serve` in a subprocess on a loopback port with the given adapters; stopped with SIGTERM."""

    def __init__(self, adapters: dict[str, str], port: int, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", MODEL, "--port", str(port),
               "--max-batch", "32", "--max-queue", "256", *extra]
        for name, path in adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        super().__init__(cmd, port, "lorakit serve")


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, generated tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    for line in post_stream(port, "/v1/completions", body, "lorakit serve"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
            ttft = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return latency, ttft if ttft is not None else latency, tokens


def peft_batched(adapters: dict[str, str], requests: list[tuple[str, str]], max_tokens: int,
                 repeats: int = 1) -> dict[str, Any]:
    """Baseline (b): all requests as one left-padded batch through PEFT's generate(adapter_names=...).

    Args:
        adapters: adapter name -> folder, all loaded into one PeftModel.
        requests: (adapter name, prompt) pairs, generated as one batch.
        max_tokens: new tokens per row (greedy).
        repeats: how many times the batch is generated; the row reports the median run.
    """
    import torch
    from peft import PeftModel

    from lorakit.io.models import load_model, quiet_third_party_notices

    base, tok = load_model(MODEL)
    names = list(adapters)
    # PEFT's notes on lorakit's own metadata key and on a renamed transformers method are not the bench's news.
    warnings.filterwarnings("ignore", message=r"Unexpected keyword arguments \['lorakit'\]")
    quiet_third_party_notices()
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    tok.padding_side = "left"
    batch = tok([p for _, p in requests], return_tensors="pt", padding=True)
    runs = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(**batch, adapter_names=[m for m, _ in requests], max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        tokens = _tokens_to_eos(out[:, batch["input_ids"].shape[1]:].tolist(), tok.eos_token_id)
        row = summarize([wall] * len(requests), [], tokens, wall)
        row["cpu_ms_per_token"] = 1000 * cpu / max(tokens, 1)
        runs.append(row)
    return median_row(runs)


def _tokens_to_eos(rows: list[list[int]], eos: int) -> int:
    """Generated tokens counted up to and including each row's first EOS, as the server counts them."""
    return sum(next((i + 1 for i, t in enumerate(row) if t == eos), len(row)) for row in rows)


def target_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, from the medians, at the top concurrency: many adapters vs one, vs (a), vs (b), one adapter
    vs llama.cpp's F32 base, and the time to first token of (c), prefill one at a time, vs batched prefill.

    Args:
        results: the report's rows (``system``, ``adapters``, ``concurrency``, ``tokens_per_s``, ``ttft_p50_s``).
    """
    ours = [r for r in results if r["system"] == "lorakit serve"]
    if not ours:
        return []
    top = max(r["concurrency"] for r in ours)
    at_top = {r["adapters"]: r for r in ours if r["concurrency"] == top}
    many, one = at_top[max(at_top)]["tokens_per_s"], at_top[min(at_top)]["tokens_per_s"]
    baselines = {r["system"][:3]: r for r in results if r["system"].startswith("(")}  # "(a)", "(b)", "(c)", ...
    llama = [r["tokens_per_s"] for r in results
             if r["system"] == LLAMA_CPP_F32 and r["adapters"] == min(at_top) and r["concurrency"] == top]
    label = f"at concurrency {top}"
    checks = [] if max(at_top) == min(at_top) else [(f"{max(at_top)} adapters / 1 adapter {label}", many / one, 0.9)]
    for key, name, target in (("(a)", "(a) one at a time", 4.0), ("(b)", "(b) PEFT batched", 1.0)):
        if key in baselines:
            checks.append((f"{max(at_top)} adapters {label} / {name}", many / baselines[key]["tokens_per_s"], target))
    if llama:  # issue 33: one adapter at least as fast as llama.cpp on the same fp32 weights
        checks.append((f"1 adapter {label} / {LLAMA_CPP_F32}", one / llama[0], 1.0))
    paired = next((r for r in results if r["system"] == PAIRED[0]), None)
    if paired:  # the same ratio from alternating cells: the fairer figure on a machine that drifts
        ratios = paired["pair_ratios"]
        checks.append((f"1 adapter / {LLAMA_CPP_F32}, median of {len(ratios)} paired runs",
                       statistics.median(ratios), 1.0))
    ttft, alone = at_top[min(at_top)].get("ttft_p50_s"), baselines.get("(c)", {}).get("ttft_p50_s")
    if ttft and alone:  # issue 33: batched prefill halves the time to first token
        checks.append((f"TTFT p50 {label}: (c) prefill alone / batched prefill", alone / ttft, 2.0))
    return [{"check": name, "ratio": ratio, "target": target, "met": ratio >= target} for name, ratio, target in checks]


def _cell(server: ServerProcess, prompts: list[str], adapters: int, concurrency: int, n: int,
          max_tokens: int) -> dict:
    requests = [(f"task{i % adapters}", prompts[i % len(prompts)]) for i in range(n)]
    row = timed_cell(server, lambda r: one_request(server.port, r[0], r[1], max_tokens), requests, concurrency)
    row.update(adapters=adapters, concurrency=concurrency)
    print_cell(row)
    return row


def _serve_grid(adapter_files: dict[str, str], prompts: list[str], args, counts, levels, system: str,
                extra: tuple[str, ...] = ()) -> list:
    """Cells of one server (``lorakit serve`` plus ``extra`` flags) over adapter counts and concurrency levels;
    repeated ``args.repeats`` times for the main grid, once for a baseline."""
    batching = "--no-batching" not in extra
    server = ServerProcess(adapter_files, args.port, list(extra))
    repeats = args.repeats if system == "lorakit serve" else 1  # baselines are far from their targets: one run
    try:
        server.wait_ready()
        burst = [(f"task{i % max(counts)}", prompts[i % len(prompts)]) for i in range(max(levels))]
        warm_up(lambda r: one_request(args.port, r[0], r[1], 8), burst, max(levels))
        rows = []
        for concurrency in levels:
            runs: dict[int, list[dict]] = {adapters: [] for adapters in counts}
            for _ in range(repeats):  # adapter counts interleaved, so drift in the machine hits each alike
                for adapters in counts:
                    n = args.baseline_requests if not batching else max(concurrency * args.rounds, 4)
                    runs[adapters].append(_cell(server, prompts, adapters, concurrency, n, args.max_tokens))
            rows += [{**median_row(runs[adapters]), "system": system} for adapters in counts]
        return rows
    finally:
        server.stop()


def run_serve_bench(args: Any, argv: list[str]) -> int:
    """The whole load test: lorakit serve's grid, baselines (a) and (b), llama.cpp, then JSON, markdown, a plot.

    Args:
        args: ``lorakit bench serve``'s parsed flags (``lorakit.cli.bench``).
        argv: the command line, recorded in the report.
    """
    counts = [int(x) for x in args.adapters.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prompts = e2e_prompts(args.data, max(max(levels) * args.rounds, args.baseline_requests))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "max_tokens": args.max_tokens, "argv": argv}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_adapters(Path(tmp), max(counts))
        print("lorakit serve, continuous batching:", flush=True)
        rows = _serve_grid(files, prompts, args, counts, levels, "lorakit serve")
        rows += _baselines(files, prompts, args, max(counts), max(levels))
        rows += _llama_cpp_side(files, prompts, args, counts, max(levels), Path(tmp), meta)
    meta["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "results": rows, "targets": target_checks(rows)}
    (args.out / "bench_serve.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench_serve.md").write_text(render_table(report))
    plot(report, args.out / "bench_serve.png")
    print(render_table(report))
    return 0


def _baselines(files: dict[str, str], prompts: list[str], args: Any, adapters: int, concurrency: int) -> list:
    """Baseline (a), the server one request at a time, (c)/(d), the server without batched prefill or without
    packed weights, and (b), PEFT's batched generate, unless turned off."""
    rows = []
    if not args.no_batching_off:
        print("baseline (a): batching off, one request at a time:", flush=True)
        rows += _serve_grid(files, prompts, args, [adapters], [concurrency], BATCHING_OFF, ("--no-batching",))
    if not args.no_server_variants:  # what batched prefill and packed weights each bring, one cell each
        for system, flags in SERVER_VARIANTS.items():
            print(f"baseline {system}:", flush=True)
            rows += _serve_grid(files, prompts, args, [1], [concurrency], system, flags)
    if not args.no_peft:
        requests = [(f"task{i % adapters}", prompts[i]) for i in range(args.baseline_requests)]
        row = peft_batched(files, requests, args.max_tokens, args.repeats)
        row.update(system="(b) PEFT generate(adapter_names)", adapters=adapters, concurrency=args.baseline_requests)
        runs = ", ".join(f"{x:.1f}" for x in row["tokens_per_s_runs"])
        print(f"baseline (b): {row['tokens_per_s']:.1f} tok/s median ({runs}), "
              f"batch latency {row['p50_s']:.2f} s", flush=True)
        rows.append(row)
    return rows


def _llama_cpp_side(files: dict[str, str], prompts: list[str], args: Any, counts: list[int], concurrency: int,
                    tmp: Path, meta: dict) -> list:
    """llama.cpp's llama-server on the same adapters (GGUF) and prompts; skipped, with the reason printed
    and recorded in ``meta``, when it is off or not built."""
    from lorakit.bench import llama_cpp
    from lorakit.io.models import load_tokenizer, model_path

    reason = "--no-llama-cpp" if args.no_llama_cpp else llama_cpp.skip_reason(args.llama_server)
    if reason is not None:
        print(f"llama.cpp side skipped: {reason}", flush=True)
        meta["llama_cpp_skipped"] = reason
        return []
    loras, bases = llama_cpp.export_inputs(files, tmp / "gguf", MODEL)
    tokenizer = load_tokenizer(model_path(MODEL))
    ids = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]  # as lorakit serve tokenizes
    meta["llama_cpp"] = {"server": str(args.llama_server), "threads": args.llama_threads, "slots": concurrency}
    rows = llama_cpp.llama_cpp_rows(args.llama_server, loras, bases, ids, counts, concurrency, args)
    if args.pairs > 0:
        rows += _paired_side(files, prompts, ids, loras[0], bases["F32 base"], concurrency, args)
    return rows


def _paired_side(files: dict[str, str], prompts: list[str], ids: list[list[int]], lora: Path, base: Path,
                 concurrency: int, args: Any) -> list[dict]:
    """lorakit serve and llama.cpp's F32 side up together, ``args.pairs`` pairs of one-adapter cells."""
    from lorakit.bench import llama_cpp

    n = max(concurrency * args.rounds, 4)
    ours = ServerProcess(dict(list(files.items())[:1]), args.port, [])
    theirs = LoopbackServer(llama_cpp.server_command(args.llama_server, base, [lora], args.port + 1, concurrency,
                                                     args.llama_threads), args.port + 1, "llama-server")
    print(f"paired: lorakit serve and llama.cpp's F32 side, {args.pairs} pairs of one-adapter cells:", flush=True)
    try:
        ours.wait_ready()
        theirs.wait_ready()
        short = [(prompts[i % len(prompts)], llama_cpp.completion_body(ids[i % len(ids)], 8, 0))
                 for i in range(concurrency)]  # fmt: skip
        warm_up(lambda r: one_request(ours.port, "task0", r[0], 8), short, concurrency)
        warm_up(lambda r: llama_cpp.one_completion(theirs.port, r[1]), short, concurrency)
        return paired_rows(lambda: _cell(ours, prompts, 1, concurrency, n, args.max_tokens),
                           lambda: llama_cpp.llama_cpp_cell(theirs, ids, 1, n, concurrency, args.max_tokens),
                           args.pairs)
    finally:
        ours.stop()
        theirs.stop()


def paired_rows(ours: Callable[[], dict], theirs: Callable[[], dict], pairs: int) -> list[dict]:
    """Two servers' cells alternating, in ABBA order so neither always goes first: one median row each, with
    each pair's tokens/s ratio (ours / theirs) on ours as ``pair_ratios``.

    Args:
        ours: runs one lorakit cell and returns its row.
        theirs: runs one cell of the other server.
        pairs: how many pairs.
    """
    mine, other = [], []
    for i in range(pairs):
        if i % 2 == 0:
            mine.append(ours())
            other.append(theirs())
        else:
            other.append(theirs())
            mine.append(ours())
    row = {**median_row(mine), "system": PAIRED[0]}
    row["pair_ratios"] = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine, other)]
    return [row, {**median_row(other), "system": PAIRED[1]}]


def render_table(report: dict) -> str:
    """The markdown table docs/records/performance.md carries: medians of repeated runs, then the targets."""
    lines = ["| system | adapters | concurrency | requests | tokens/s (median) | runs tok/s | p50 s | p99 s | "
             "TTFT p50 s | CPU ms/token |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        ttft = f"{r['ttft_p50_s']:.2f}" if r.get("ttft_p50_s") is not None else "—"
        cpu = f"{r['cpu_ms_per_token']:.0f}" if r.get("cpu_ms_per_token") is not None else "—"
        runs = " / ".join(f"{x:.0f}" for x in r.get("tokens_per_s_runs", [r["tokens_per_s"]]))
        lines.append(f"| {r['system']} | {r['adapters']} | {r['concurrency']} | {r['requests']} | "
                     f"{r['tokens_per_s']:.1f} | {runs} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {ttft} | {cpu} |")
    if report.get("targets"):
        lines += ["", "| target | ratio | needed | met |", "|---|---:|---:|---|"]
        lines += [f"| {t['check']} | {t['ratio']:.2f}× | ≥ {t['target']:.2f}× | {'yes' if t['met'] else 'no'} |"
                  for t in report["targets"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Throughput and p99 latency against concurrency, one line per adapter count, baselines as points; with
    one concurrency level, bars of tokens/s and TTFT p50 per side instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    if len({r["concurrency"] for r in report["results"] if r["system"] == "lorakit serve"}) == 1:
        _bars(report["results"], left, right)
    else:
        _lines(report["results"], left, right)
    fig.suptitle(f"lorakit serve, smollm2-135m, {report['meta']['max_tokens']} new tokens, shared 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _bars(results: list[dict], left: Any, right: Any) -> None:
    """One bar per side and adapter count: generated tokens/s, and TTFT p50 where it was measured."""
    labels = [f"{r['system']}, {r['adapters']} adapter(s)" for r in results]
    colors = ["tab:blue" if r["system"].startswith("lorakit serve") else "tab:gray" for r in results]
    left.barh(labels, [r["tokens_per_s"] for r in results], color=colors)
    right.barh(labels, [r.get("ttft_p50_s") or 0 for r in results], color=colors)
    left.set_title(f"generated tokens/s at {results[0]['concurrency']} clients (median)")
    right.set_title("time to first token, p50 (s)")
    right.set_yticks([])
    for ax in (left, right):
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="y", labelsize=8)


def _lines(results: list[dict], left: Any, right: Any) -> None:
    ours = [r for r in results if r["system"] == "lorakit serve"]
    for count in sorted({r["adapters"] for r in ours}):
        rows = sorted((r for r in ours if r["adapters"] == count), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=f"{count} adapter(s)")
        right.plot(xs, [r["p99_s"] for r in rows], marker="o", label=f"{count} adapter(s)")
    others = [r for r in results if r["system"] != "lorakit serve"]
    for r, marker in zip(others, ("s", "^", "D", "v", "P", "X", "*", "h")):
        label = f"{r['system']}, {r['adapters']} adapter(s)"
        left.plot([r["concurrency"]], [r["tokens_per_s"]], marker=marker, linestyle="", label=label)
        right.plot([r["concurrency"]], [r["p99_s"]], marker=marker, linestyle="", label=label)
    for ax, title in ((left, "generated tokens/s"), (right, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
