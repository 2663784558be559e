"""`lorakit bench serve`'s llama.cpp side without llama.cpp: the command, the requests, the stream reader,
the skip reason and the target check. (The side itself ran against a real llama-server for
docs/records/performance.md.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lorakit.bench import llama_cpp
from lorakit.bench.serve_load import LLAMA_CPP_F32, _llama_cpp_side, target_checks
from serve_util import sse_server


def test_skip_reason_names_the_missing_binary_and_how_to_build_it(tmp_path):
    missing = tmp_path / "bin" / "llama-server"
    reason = llama_cpp.skip_reason(missing)
    assert reason.startswith(f"llama-server not built ({missing} missing)") and "scripts/llama_cpp.sh" in reason
    missing.parent.mkdir()
    missing.write_text("#!/bin/sh\n")
    assert llama_cpp.skip_reason(missing) == f"llama-server at {missing} is not executable"
    missing.chmod(0o755)
    assert llama_cpp.skip_reason(missing) is None


def test_default_binary_follows_the_build_scripts_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(llama_cpp.CACHE_ENV, str(tmp_path))
    assert llama_cpp.default_server_path() == tmp_path / "bin" / "llama-server"


def test_server_command_loads_every_adapter_unapplied_on_loopback():
    cmd = llama_cpp.server_command(Path("/b/llama-server"), Path("base.gguf"), [Path("a0.gguf"), Path("a1.gguf")],
                                   port=9001, parallel=32, threads=2)
    assert cmd[:3] == ["/b/llama-server", "-m", "base.gguf"]
    pairs = dict(zip(cmd[3::2], cmd[4::2]))
    assert (pairs["--host"], pairs["--port"], pairs["-np"], pairs["-t"]) == ("127.0.0.1", "9001", "32", "2")
    assert int(pairs["-c"]) == 32 * llama_cpp.CTX_PER_SLOT
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--lora"] == ["a0.gguf", "a1.gguf"]  # ids 0, 1 in order
    assert cmd[-1] == "--lora-init-without-apply"
    assert "--lora-init-without-apply" not in llama_cpp.server_command(Path("s"), Path("m"), [], 1, 1, 1)


def test_completion_body_is_greedy_streamed_and_names_one_adapter():
    body = llama_cpp.completion_body([1, 2, 3], 64, 7)
    assert body == {"prompt": [1, 2, 3], "n_predict": 64, "temperature": 0, "stream": True, "cache_prompt": False,
                    "lora": [{"id": 7, "scale": 1.0}]}
    assert llama_cpp.completion_body([1], 8, None)["lora"] == []


def test_read_event_parses_data_lines_and_raises_on_errors():
    assert llama_cpp.read_event('data: {"content": "Hi", "stop": false}') == {"content": "Hi", "stop": False}
    assert llama_cpp.read_event("") is None
    with pytest.raises(RuntimeError, match=r"llama-server: .*lora id 40 out of range"):
        llama_cpp.read_event('error: {"code": 400, "message": "lora id 40 out of range"}')


# llama-server's streamed shape (tools/server/server-task.cpp): partial events with ``content``/``tokens``,
# then a final one with ``stop: true`` and ``tokens_predicted``.
LLAMA_EVENTS = [{"content": "", "tokens": [], "stop": False},  # e.g. a prompt-progress event: no token yet
                {"content": "The", "tokens": [504], "stop": False},
                {"content": " Eagle", "tokens": [18923], "stop": False},
                {"content": "", "tokens": [], "stop": True, "tokens_predicted": 3, "timings": {"predicted_n": 3}}]


def test_one_completion_counts_the_servers_predicted_tokens_and_times_the_first():
    with sse_server([f"data: {json.dumps(e)}" for e in LLAMA_EVENTS]) as (port, bodies):
        latency, ttft, tokens = llama_cpp.one_completion(port, llama_cpp.completion_body([1], 4, 2))
    assert tokens == 3 and 0 < ttft <= latency
    assert bodies[-1]["lora"] == [{"id": 2, "scale": 1.0}]


def test_side_is_skipped_with_its_reason_when_llama_server_is_not_built(tmp_path, capsys):
    args = argparse.Namespace(no_llama_cpp=False, llama_server=tmp_path / "nope" / "llama-server")
    meta: dict = {}
    assert _llama_cpp_side({}, [], args, [1], 32, tmp_path, meta) == []
    out = capsys.readouterr().out
    assert out.startswith("llama.cpp side skipped: llama-server not built (")
    assert meta["llama_cpp_skipped"].startswith("llama-server not built")
    args.no_llama_cpp = True
    assert _llama_cpp_side({}, [], args, [1], 32, tmp_path, meta) == []
    assert meta["llama_cpp_skipped"] == "--no-llama-cpp"


def test_target_checks_compare_one_adapter_with_llama_cpp_on_the_same_fp32_weights():
    def row(system, adapters, tps):
        return {"system": system, "adapters": adapters, "concurrency": 32, "tokens_per_s": tps}

    rows = [row("lorakit serve", 1, 117.0), row("lorakit serve", 32, 118.0), row(LLAMA_CPP_F32, 1, 208.0),
            row(LLAMA_CPP_F32, 32, 39.0), row("llama.cpp, Q4_1 base (shipped)", 1, 185.0)]
    checks = {c["check"]: c for c in target_checks(rows)}
    check = checks[f"1 adapter at concurrency 32 / {LLAMA_CPP_F32}"]
    assert check["ratio"] == pytest.approx(117.0 / 208.0) and check["target"] == 1.0 and not check["met"]
    assert len(checks) == 2  # with 32 / 1 adapters; no (a) or (b) rows, no check for them


def test_the_shipped_base_type_is_read_from_its_gguf_header():
    from lorakit.io.models import builtin_gguf

    path = builtin_gguf("smollm2-135m")
    if path is None or not path.is_file():
        pytest.skip("the built-in SmolLM2 GGUF is not installed")
    assert llama_cpp._gguf_type(path) == "Q4_1"
