"""`lorakit bench serve`: a closed-loop load generator against `lorakit serve` on loopback.

Starts `lorakit serve` as a subprocess on smollm2-135m with N random rank-8 q,v adapters (as costly as
trained ones), sends E2E meaning representations as streamed completions from C closed-loop clients (each
sends its next request when the previous one ends), and records generated tokens/s, p50/p99 latency and
time to first token. Baselines in the same run: (a) the server with batching off (one request at a time,
adapter switched per request) and (b) PEFT's batched ``generate(adapter_names=...)`` on the same requests.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"


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


class ServerProcess:
    """`lorakit serve` in a subprocess on a loopback port; stopped with SIGTERM (graceful)."""

    def __init__(self, adapters: dict[str, str], port: int, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", MODEL, "--port", str(port),
               "--max-batch", "32", "--max-queue", "256", *extra]
        for name, path in adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        self.port = port
        # A file, not a pipe: uvicorn logs every request, and an unread pipe would block the server.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="lorakit-serve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"lorakit serve exited: {self.log.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("lorakit serve did not become ready")

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (user + system, all threads); None off Linux.

        On a shared CPU wall-clock rates mostly measure the neighbours; CPU time per token measures the work.
        """
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, generated tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
            ttft = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    latency = time.perf_counter() - start
    return latency, ttft if ttft is not None else latency, tokens


def closed_loop(port: int, requests: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """``concurrency`` clients drain ``requests`` (model, prompt), each sending its next when one ends."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    todo = list(reversed(requests))

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                model, prompt = todo.pop()
            r = one_request(port, model, prompt, max_tokens)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summarize([r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results), wall)


def summarize(latencies: list[float], ttfts: list[float], tokens: int, wall: float) -> dict[str, Any]:
    def pct(xs: list[float], q: float) -> float | None:
        if not xs:
            return None
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"requests": len(latencies), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99),
            "ttft_p50_s": pct(ttfts, 0.5) if ttfts else None, "mean_s": statistics.fmean(latencies)}


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


MEDIAN_FIELDS = ("tokens_per_s", "p50_s", "p99_s", "ttft_p50_s", "mean_s", "wall_s", "cpu_ms_per_token")


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a cell: the median of each figure, plus every run's tokens/s.

    Args:
        runs: rows of the same cell (same system, adapters and concurrency), in the order they ran.
    """
    row = dict(runs[0])
    for field in MEDIAN_FIELDS:
        values = [r[field] for r in runs if r.get(field) is not None]
        row[field] = statistics.median(values) if values else None
    row["requests"] = sum(r["requests"] for r in runs)
    row["tokens"] = sum(r["tokens"] for r in runs)
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return row


def target_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three targets, from the medians: at the top concurrency, many adapters vs one, vs (a), vs (b).

    Args:
        results: the report's rows (``system``, ``adapters``, ``concurrency``, ``tokens_per_s``).
    """
    ours = [r for r in results if r["system"] == "lorakit serve"]
    if not ours:
        return []
    top = max(r["concurrency"] for r in ours)
    at_top = {r["adapters"]: r["tokens_per_s"] for r in ours if r["concurrency"] == top}
    many, one = at_top[max(at_top)], at_top[min(at_top)]
    others = {r["system"][:3]: r["tokens_per_s"] for r in results if r["system"] != "lorakit serve"}
    checks = []
    if max(at_top) != min(at_top):
        checks.append((f"{max(at_top)} adapters / 1 adapter at concurrency {top}", many / one, 0.85))
    if "(a)" in others:
        checks.append((f"{max(at_top)} adapters at concurrency {top} / (a) one at a time", many / others["(a)"], 4.0))
    if "(b)" in others:
        checks.append((f"{max(at_top)} adapters at concurrency {top} / (b) PEFT batched", many / others["(b)"], 1.0))
    return [{"check": name, "ratio": ratio, "target": target, "met": ratio >= target} for name, ratio, target in checks]


def _cell(server: ServerProcess, prompts: list[str], adapters: int, concurrency: int, n: int,
          max_tokens: int) -> dict:
    requests = [(f"task{i % adapters}", prompts[i % len(prompts)]) for i in range(n)]
    cpu = server.cpu_seconds()
    row = closed_loop(server.port, requests, concurrency, max_tokens)
    after = server.cpu_seconds()
    row["cpu_ms_per_token"] = None if cpu is None or after is None else 1000 * (after - cpu) / max(row["tokens"], 1)
    row.update(adapters=adapters, concurrency=concurrency)
    print(f"  {adapters:>2} adapters, concurrency {concurrency:>2}: {row['tokens_per_s']:7.1f} tok/s, "
          f"p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s, TTFT p50 {row['ttft_p50_s']:.2f} s", flush=True)
    return row


def _serve_grid(adapter_files: dict[str, str], prompts: list[str], args, counts, levels, batching: bool) -> list:
    server = ServerProcess(adapter_files, args.port, [] if batching else ["--no-batching"])
    repeats = args.repeats if batching else 1  # (a) is ~10x slower and far from its target: one run
    try:
        server.wait_ready()
        one_request(args.port, "task0", prompts[0], 4)  # warm-up: first-call allocations
        rows = []
        for concurrency in levels:
            runs: dict[int, list[dict]] = {adapters: [] for adapters in counts}
            for _ in range(repeats):  # adapter counts interleaved, so drift in the machine hits each alike
                for adapters in counts:
                    n = args.baseline_requests if not batching else max(concurrency * args.rounds, 4)
                    runs[adapters].append(_cell(server, prompts, adapters, concurrency, n, args.max_tokens))
            for adapters in counts:
                row = median_row(runs[adapters])
                row["system"] = "lorakit serve" if batching else "(a) batching off"
                rows.append(row)
        return rows
    finally:
        server.stop()


def run_serve_bench(args: Any, argv: list[str]) -> int:
    """The whole load test: lorakit serve's grid, baselines (a) and (b), then JSON, markdown and a plot.

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
        rows = _serve_grid(files, prompts, args, counts, levels, batching=True)
        print("baseline (a): batching off, one request at a time:", flush=True)
        rows += _serve_grid(files, prompts, args, [max(counts)], [max(levels)], batching=False)
        if not args.no_peft:
            requests = [(f"task{i % max(counts)}", prompts[i]) for i in range(args.baseline_requests)]
            row = peft_batched(files, requests, args.max_tokens, args.repeats)
            row.update(system="(b) PEFT generate(adapter_names)", adapters=max(counts),
                       concurrency=args.baseline_requests)
            runs = ", ".join(f"{x:.1f}" for x in row["tokens_per_s_runs"])
            print(f"baseline (b): {row['tokens_per_s']:.1f} tok/s median ({runs}), "
                  f"batch latency {row['p50_s']:.2f} s", flush=True)
            rows.append(row)
    meta["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "results": rows, "targets": target_checks(rows)}
    (args.out / "bench_serve.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench_serve.md").write_text(render_table(report))
    plot(report, args.out / "bench_serve.png")
    print(render_table(report))
    return 0


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
        lines += ["", "| target | ratio of medians | needed | met |", "|---|---:|---:|---|"]
        lines += [f"| {t['check']} | {t['ratio']:.2f}× | ≥ {t['target']:.2f}× | {'yes' if t['met'] else 'no'} |"
                  for t in report["targets"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Throughput and p99 latency against concurrency, one line per adapter count, baselines as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ours = [r for r in report["results"] if r["system"] == "lorakit serve"]
    for count in sorted({r["adapters"] for r in ours}):
        rows = sorted((r for r in ours if r["adapters"] == count), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=f"{count} adapter(s)")
        right.plot(xs, [r["p99_s"] for r in rows], marker="o", label=f"{count} adapter(s)")
    for r, marker in zip([r for r in report["results"] if r["system"] != "lorakit serve"], ("s", "^")):
        left.plot([r["concurrency"]], [r["tokens_per_s"]], marker=marker, linestyle="", label=r["system"])
        right.plot([r["concurrency"]], [r["p99_s"]], marker=marker, linestyle="", label=r["system"])
    for ax, title in ((left, "generated tokens/s"), (right, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"lorakit serve, smollm2-135m, {report['meta']['max_tokens']} new tokens, shared 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
