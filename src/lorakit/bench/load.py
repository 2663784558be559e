"""What every side of `lorakit bench serve` shares: a server process on loopback and closed-loop clients.

A side is a server (``lorakit serve`` or llama.cpp's ``llama-server``) started as a subprocess, and a
``send`` function that makes one request and returns (latency s, time to first token s, generated tokens).
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Send = Callable[[Any], tuple[float, float, int]]


class LoopbackServer:
    """A server command run in a subprocess on a 127.0.0.1 port, its output in a temporary file.

    Args:
        cmd: the command line.
        port: the loopback port it listens on.
        name: what error messages call it.
    """

    def __init__(self, cmd: list[str], port: int, name: str) -> None:
        self.port, self.name = port, name
        # A file, not a pipe: servers log every request, and an unread pipe would block them.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="lorakit-bench-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 600) -> None:
        """Return once ``GET /health`` answers 200; raise with the log's tail if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready")

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
        """SIGTERM (graceful), SIGKILL after two minutes."""
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def post_stream(port: int, path: str, body: dict[str, Any], server: str) -> Iterator[str]:
    """The decoded, stripped lines of one streamed POST to a loopback server; the connection is closed after.

    Args:
        port: the server's loopback port.
        path: the endpoint, e.g. ``/v1/completions``.
        body: the JSON request.
        server: the server's name, for the error on a non-200 answer.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{server} HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            yield raw.decode().strip()
    finally:
        conn.close()


def closed_loop(send: Send, requests: list[Any], concurrency: int) -> dict[str, Any]:
    """``concurrency`` clients drain ``requests``, each sending its next when its previous one ends.

    Args:
        send: makes one request, returns (latency s, time to first token s, generated tokens).
        requests: what ``send`` takes, in order.
        concurrency: the number of client threads.
    """
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    todo = list(reversed(requests))

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                request = todo.pop()
            r = send(request)
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


def warm_up(send: Send, requests: list[Any], concurrency: int) -> None:
    """One untimed burst before a server's first cell: first-call allocations, the allocator's growth and
    oneDNN's kernels for batch shapes are paid here, by every side alike, not in the first timed cell.

    Args:
        send: as in :func:`closed_loop`.
        requests: short requests, as many as there are clients.
        concurrency: the number of client threads.
    """
    closed_loop(send, requests, concurrency)


def timed_cell(server: LoopbackServer, send: Send, requests: list[Any], concurrency: int) -> dict[str, Any]:
    """One closed-loop run, plus the server's CPU milliseconds per generated token.

    Args:
        server: the server the requests go to (its CPU time is read before and after).
        send: as in :func:`closed_loop`.
        requests: as in :func:`closed_loop`.
        concurrency: as in :func:`closed_loop`.
    """
    cpu = server.cpu_seconds()
    row = closed_loop(send, requests, concurrency)
    after = server.cpu_seconds()
    row["cpu_ms_per_token"] = None if cpu is None or after is None else 1000 * (after - cpu) / max(row["tokens"], 1)
    return row


def summarize(latencies: list[float], ttfts: list[float], tokens: int, wall: float) -> dict[str, Any]:
    """A row's figures: requests, tokens, tokens/s over the wall time, latency and TTFT percentiles.

    Args:
        latencies: seconds per request.
        ttfts: seconds to each request's first token (empty: not measured).
        tokens: generated tokens, all requests together.
        wall: seconds from the first request sent to the last answer.
    """

    def pct(xs: list[float], q: float) -> float | None:
        if not xs:
            return None
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"requests": len(latencies), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99),
            "ttft_p50_s": pct(ttfts, 0.5) if ttfts else None, "mean_s": statistics.fmean(latencies)}


def print_cell(row: dict) -> None:
    """One progress line per measured cell."""
    print(f"  {row['adapters']:>2} adapters, concurrency {row['concurrency']:>2}: {row['tokens_per_s']:7.1f} tok/s, "
          f"p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s, TTFT p50 {row['ttft_p50_s']:.2f} s", flush=True)


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
