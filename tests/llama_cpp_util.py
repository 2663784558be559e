"""llama.cpp as built by scripts/llama_cpp.sh: find the binaries and sources, run llama-server, query it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorakit.bench.llama_cpp import default_server_path, llama_cpp_cache, skip_reason


def server_binary() -> Path | None:
    """llama-server, if scripts/llama_cpp.sh built it."""
    path = default_server_path()
    return path if skip_reason(path) is None else None


def source_tree() -> Path | None:
    """The llama.cpp source tree (with convert_lora_to_gguf.py and gguf-py), if downloaded."""
    found = sorted(llama_cpp_cache().glob("src/*/llama.cpp/convert_lora_to_gguf.py"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(model: Path, lora: Path | None = None, timeout: float = 300) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 for one model (and adapter); yields its base URL; stops it after.

    Args:
        model: the GGUF model.
        lora: a GGUF LoRA adapter, applied at scale 1.
        timeout: seconds to wait for the model to load.
    """
    port = _free_port()
    cmd = [str(server_binary()), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "1024",
           "-np", "1", "-t", "2", "--no-warmup", "-ctk", "f32", "-ctv", "f32"]  # an f32 KV cache, as lorakit's
    if lora is not None:
        cmd += ["--lora", str(lora)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError("llama-server did not become healthy")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def greedy_completion(url: str, prompt: list[int], n: int, n_probs: int = 5) -> tuple[list[int], list[dict], set[int]]:
    """(generated token ids, per step {token id: log-probability} of the top ``n_probs``, the token ids the
    server barred) from /completion, greedy (temperature < 0: llama.cpp's argmax; log-probabilities from a
    plain softmax of the logits, before any bias).

    ``ignore_eos`` makes llama.cpp bar every end-of-generation token (a -inf logit bias, which the reply's
    ``generation_settings.logit_bias`` lists): a comparison must bar the same ids on its side.

    Args:
        url: the server.
        prompt: token ids (no BOS is added to a token prompt).
        n: tokens to generate.
        n_probs: log-probabilities to return per step.
    """
    body = {"prompt": prompt, "n_predict": n, "temperature": -1, "n_probs": n_probs, "ignore_eos": True,
            "cache_prompt": False, "return_tokens": True, "seed": 0}
    req = urllib.request.Request(f"{url}/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    steps = [{int(t["id"]): float(t["logprob"]) for t in step["top_logprobs"]}
             for step in reply["completion_probabilities"]]
    barred = {int(b["token"]) for b in reply["generation_settings"]["logit_bias"] if b["bias"] is None}
    return [int(t) for t in reply["tokens"]], steps, barred
