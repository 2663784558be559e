"""`--adapter-root` lazy adapter loading with `--max-loaded-adapters` LRU eviction (issue 33): first use loads
once, idle adapters are evicted least recently used first, busy ones never, names cannot leave the root,
and /metrics counts loads, evictions and the resident set. Servers run on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

pytest.importorskip("fastapi")

from lorakit.serve.app import ServeSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.server import BackgroundServer
from serve_util import greedy_reference, raw, save_random_adapters, tiny_lm, wait_for

PROMPT = "name : Alimentum | area : city centre ||"


@pytest.fixture(scope="module")
def root(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("root")
    save_random_adapters(lambda: tiny_lm(tok), ["a0", "a1", "a2"], folder)
    return folder


def _server(tok, root, **settings) -> BackgroundServer:
    engine = Engine(tiny_lm(tok), tok, max_batch=4, max_queue=16)
    srv = BackgroundServer(create_app(engine, ServeSettings(base_name="tiny", max_model_len=200,
                                                            adapter_roots=(str(root),), **settings)))
    srv.engine = engine
    return srv


def _complete(url: str, model: str, max_tokens: int = 6) -> tuple[int, dict]:
    code, _, body = raw(url, "POST", "/v1/completions", {"model": model, "prompt": PROMPT,
                                                          "max_tokens": max_tokens, "temperature": 0})
    return code, body


def _metric(url: str, name: str) -> float:
    text = raw(url, "GET", "/metrics")[2]
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def _models(url: str) -> list[str]:
    return [m["id"] for m in raw(url, "GET", "/v1/models")[2]["data"]]


def test_first_use_loads_from_the_root_once_and_serves_it_exactly(tok, root):
    import lorakit

    reference = tiny_lm(tok)
    lorakit.load_adapter(reference, root / "a1", "a1", activate=False)
    expected = tok.decode(greedy_reference(reference, "a1", tok(PROMPT).input_ids, 6), skip_special_tokens=True)
    with _server(tok, root) as srv:
        assert "a1" not in _models(srv.url)
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(_complete(srv.url, "a1"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [code for code, _ in answers] == [200] * 4, answers
        assert {body["choices"][0]["text"] for _, body in answers} == {expected}
        assert _metric(srv.url, "lorakit_adapter_loads_total") == 1  # four first requests, one load
        assert "a1" in _models(srv.url) and _metric(srv.url, "lorakit_resident_adapters") == 1


def test_least_recently_used_idle_adapter_is_evicted(tok, root):
    with _server(tok, root, max_loaded_adapters=2) as srv:
        for name in ("a0", "a1", "a0"):  # a1 is now the least recently used
            assert _complete(srv.url, name)[0] == 200
        assert _complete(srv.url, "a2")[0] == 200
        assert set(_models(srv.url)) == {"tiny", "a0", "a2"}
        assert _metric(srv.url, "lorakit_adapter_evictions_total") == 1
        assert _metric(srv.url, "lorakit_resident_adapters") == 2
        assert _complete(srv.url, "a1")[0] == 200  # back again: a0 (older than a2) goes
        assert set(_models(srv.url)) == {"tiny", "a1", "a2"}
        assert _metric(srv.url, "lorakit_adapter_loads_total") == 4


def test_an_adapter_in_use_is_never_evicted(tok, root):
    with _server(tok, root, max_loaded_adapters=1) as srv:
        engine = srv.engine
        step = engine._decode

        def slow_step() -> None:
            time.sleep(0.02)
            step()

        engine._decode = slow_step
        long = threading.Thread(target=lambda: _complete(srv.url, "a0", max_tokens=150))
        long.start()
        wait_for(lambda: engine.active and engine.active[0].adapter == "a0", 60, "a0 to run")
        code, body = _complete(srv.url, "a1")
        assert code == 429 and "in use" in body["error"]["message"], body
        assert engine.active and engine.active[0].adapter == "a0"  # the running request was not disturbed
        long.join(60)
        assert _complete(srv.url, "a1")[0] == 200
        assert set(_models(srv.url)) == {"tiny", "a1"}


def test_names_cannot_leave_the_root(tok, root, tmp_path):
    outside = tmp_path / "outside"
    save_random_adapters(lambda: tiny_lm(tok), ["x"], outside)
    link = root / "escape"
    os.symlink(outside / "x", link)
    try:
        with _server(tok, root) as srv:
            for name in ("escape", "../outside/x", "nothere", "a0/../a1", "training"):
                code, body = _complete(srv.url, name)
                assert code == 404 and body["error"]["code"] == "model_not_found", (name, body)
            assert _metric(srv.url, "lorakit_adapter_loads_total") == 0
    finally:
        link.unlink()


def test_the_command_line_reaches_the_resolver(tok, root, tmp_path):
    """`lorakit serve --adapter-root DIR --max-loaded-adapters 1 --max-n 2`: the flags reach the app."""
    from lorakit.cli.serve import _parse
    from lorakit.errors import ConfigError
    from lorakit.serve.options import check_args
    from lorakit.serve.server import make_app

    base = tmp_path / "base"
    tiny_lm(tok).save_pretrained(base)
    tok.save_pretrained(base)
    args = _parse(["--model", str(base), "--adapter-root", str(root), "--max-loaded-adapters", "1", "--max-n", "2"])
    with BackgroundServer(make_app(args)) as srv:
        assert _complete(srv.url, "a1")[0] == 200
        assert _complete(srv.url, "a2")[0] == 200
        assert _models(srv.url).count("a1") + _models(srv.url).count("a2") == 1  # one slot: a1 was evicted
        code, _, body = raw(srv.url, "POST", "/v1/completions", {"model": "a2", "prompt": PROMPT, "n": 3})
        assert code == 400 and "n" in body["error"]["message"]
    with pytest.raises(ConfigError, match="--max-loaded-adapters"):
        check_args(_parse(["--model", str(base), "--max-loaded-adapters", "0"]))
    with pytest.raises(ConfigError, match="--adapter-root"):
        check_args(_parse(["--model", str(base), "--adapter-root", str(tmp_path / "missing")]))
