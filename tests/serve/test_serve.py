"""`lorakit serve` on a tiny Llama with the real SmolLM2 tokenizer: the official openai client (streaming and
not), raw HTTP for every error path, hot adapters, cancellation, auth, metrics, graceful shutdown.

Each server runs on 127.0.0.1 in a thread of this process; every wait is bounded in time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import lorakit  # noqa: E402
from lorakit.lora.adapters import configs  # noqa: E402
from lorakit.serve import adapters_admin  # noqa: E402
from lorakit.serve.app import ServeSettings, create_app  # noqa: E402
from lorakit.serve.engine import Engine, prefill_groups  # noqa: E402
from lorakit.serve.sequence import SamplingParams, Sequence  # noqa: E402
from lorakit.serve.server import BackgroundServer  # noqa: E402
from serve_util import (  # noqa: E402
    Gate,
    add_random_adapters,
    greedy_reference,
    raw,
    save_random_adapters,
    tiny_lm,
    wait_for,
)

NAMES = ["a0", "a1", "a2", "a3"]
PROMPT = "name[The Eagle], eatType[coffee shop], food[French] ->"


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def adapter_files(tok, tmp_path_factory):
    return save_random_adapters(lambda: tiny_lm(tok), NAMES, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def reference(tok, adapter_files):
    """A second copy of the served model and adapters, driven by transformers' own generate()."""
    model = tiny_lm(tok)
    for name, path in adapter_files.items():
        lorakit.load_adapter(model, path, name, activate=False)
    return model


def _served(tok, adapter_files, **settings):
    model = tiny_lm(tok)
    for name, path in adapter_files.items():
        adapters_admin.load(model, name, path, "causal-lm")
    engine = Engine(model, tok, max_batch=settings.pop("max_batch", 8), max_queue=settings.pop("max_queue", 8))
    app = create_app(engine, ServeSettings(base_name="tiny", max_tokens_cap=64, max_model_len=160, **settings))
    return BackgroundServer(app), engine


@pytest.fixture(scope="module")
def server(tok, adapter_files):
    srv, engine = _served(tok, adapter_files)
    with srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _ids(tok, text: str = PROMPT) -> list[int]:
    return tok(text).input_ids


# -- the engine itself -----------------------------------------------------------------------------------
def _run_engine(engine: Engine, requests: list[tuple[list[int], str | None, int]], late: int = 0) -> list[Sequence]:
    """Submit (ids, adapter, max_tokens) requests, ``late`` of them only after the others started decoding."""
    done = threading.Semaphore(0)
    seqs = [Sequence(ids, a, SamplingParams(max_tokens=n, temperature=0.0),
                     lambda ev: ev.finish_reason and done.release()) for ids, a, n in requests]
    first = seqs[: len(seqs) - late]
    with Gate(engine):  # all of the first group is queued before the engine admits any: one batch
        for seq in first:
            engine.submit(seq)
    if late:
        wait_for(lambda: any(s.completion_tokens >= 3 for s in first), 180, "the first requests to decode")
        for seq in seqs[len(first):]:
            engine.submit(seq)
    for _ in seqs:
        assert done.acquire(timeout=180), "a sequence never finished"
    return seqs


def test_engine_mixed_batch_equals_alone_tiny(tok):
    """32 requests (31 adapters + the base, prompt lengths 3..34, different max_tokens, 8 joining late):
    each greedy output equals the same request alone, and they really were decoded as one batch."""
    model = tiny_lm(tok)
    names = [f"m{i}" for i in range(31)]
    add_random_adapters(model, names)
    engine = Engine(model, tok, max_batch=32, max_queue=64).start()
    try:
        vocab = torch.Generator().manual_seed(7)
        requests = [(torch.randint(100, 40000, (3 + i,), generator=vocab).tolist(), ([None, *names])[i], 6 + i % 5)
                    for i in range(32)]
        together = _run_engine(engine, requests, late=8)
        assert engine.stats["peak_batch"] >= 24
        assert engine.stats["peak_prefill"] >= 16  # the first 24 prompts (3-26 tokens) were prefilled together
        assert engine.stats["prefill_passes"] < 32
        for i in (0, 1, 13, 30, 31):
            alone = _run_engine(engine, [requests[i]])[0]
            assert alone.tokens == together[i].tokens, f"request {i} changed when batched"
            assert len(alone.tokens) == requests[i][2]
    finally:
        engine.shutdown(30)


def test_prefill_groups_batch_similar_lengths_within_the_budget_and_score_echo_alone():
    def seq(length: int, echo: bool = False) -> Sequence:
        return Sequence([5] * length, None, SamplingParams(max_tokens=4, prompt_logprobs=echo), lambda ev: None)

    seqs = [seq(30), seq(10), seq(12, echo=True), seq(11), seq(29), seq(200)]
    groups = prefill_groups(seqs, 64)
    assert [[len(s.prompt_ids) for s in g] for g in groups] == [[12], [10, 11], [29, 30], [200]]
    assert all(len(g) * max(len(s.prompt_ids) for s in g) <= 64 or len(g) == 1 for g in groups)
    assert [len(g) for g in prefill_groups(seqs, 0)] == [1] * 6  # batching off: each alone


@pytest.mark.parametrize("settle_s, gap_s, together", [(0.5, 0.01, True), (0.0, 0.05, False)])
def test_an_idle_engine_lets_a_burst_arrive_and_prefills_it_together(tok, settle_s, gap_s, together):
    """Requests arriving a few ms apart at an idle engine: with a settle window they are prefilled in one pass
    (not the first alone, then the rest); without one the first is prefilled as soon as it arrives."""
    import time

    engine = Engine(tiny_lm(tok), tok, max_batch=8, max_queue=8, settle_s=settle_s).start()
    try:
        done = threading.Semaphore(0)
        for i in range(4):
            engine.submit(Sequence(_ids(tok)[: 5 + i], None, SamplingParams(max_tokens=2, temperature=0.0),
                                   lambda ev: ev.finish_reason and done.release()))
            time.sleep(gap_s)
        for _ in range(4):
            assert done.acquire(timeout=60)
        assert (engine.stats["prefill_passes"] == 1) is together, engine.stats
    finally:
        engine.shutdown(30)


def test_engine_matches_transformers_generate(tok, reference, adapter_files):
    engine = Engine(reference, tok, max_batch=4).start()
    try:
        ids = _ids(tok)
        seqs = _run_engine(engine, [(ids, name, 10) for name in NAMES])
        for name, seq in zip(NAMES, seqs):
            assert seq.tokens == greedy_reference(reference, name, ids, 10)
        assert seqs[0].tokens != seqs[1].tokens  # the adapters really differ
    finally:
        engine.shutdown(30)


def test_engine_without_batching_is_one_at_a_time_and_equal(tok, reference):
    engine = Engine(reference, tok, batching=False).start()
    try:
        ids = _ids(tok)
        seqs = _run_engine(engine, [(ids, name, 8) for name in NAMES])
        assert engine.stats["peak_batch"] == 1
        assert seqs[2].tokens == greedy_reference(reference, "a2", ids, 8)
    finally:
        engine.shutdown(30)


# -- OpenAI API through the official client --------------------------------------------------------------
def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", *NAMES]


def test_completion_non_streaming(client, tok, reference):
    out = client.completions.create(model="a1", prompt=PROMPT, max_tokens=10, temperature=0)
    expected = greedy_reference(reference, "a1", _ids(tok), 10)
    assert out.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(_ids(tok)), 10)
    assert out.usage.total_tokens == len(_ids(tok)) + 10
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert base.choices[0].text == tok.decode(greedy_reference(reference, None, _ids(tok), 10))


def test_completion_streaming_equals_non_streaming(client):
    whole = client.completions.create(model="a2", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="a2", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_completion_uses_the_chat_template(client, tok, reference):
    messages = [{"role": "user", "content": "Describe The Eagle."}]
    out = client.chat.completions.create(model="a3", messages=messages, max_tokens=8, temperature=0)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert out.choices[0].message.content == tok.decode(greedy_reference(reference, "a3", ids, 8))
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="a3", messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="a0", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    out = client.completions.create(model="a0", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="a0", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_seed_reproduces_sampling_and_top_p_tiny_is_greedy(client):
    def sample(**kw) -> str:
        return client.completions.create(model="a1", prompt=PROMPT, max_tokens=12, **kw).choices[0].text

    assert sample(temperature=1.0, seed=5) == sample(temperature=1.0, seed=5)
    assert sample(temperature=1.5, seed=5) != sample(temperature=1.5, seed=6)
    assert sample(temperature=1.0, top_p=1e-6, seed=3) == sample(temperature=0)


# -- error paths, raw HTTP -------------------------------------------------------------------------------
def _error(status_body, status: int) -> dict:
    code, _, body = status_body
    assert code == status, body
    assert set(body["error"]) >= {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def test_bad_requests_answer_400_in_openai_shape(server):
    url, ok = server.url, {"model": "a0", "prompt": "hi"}
    err = _error(raw(url, "POST", "/v1/completions", {**ok, "max_tokens": 65}), 400)
    assert err["param"] == "max_tokens" and "64" in err["message"]
    err = _error(raw(url, "POST", "/v1/completions", {**ok, "prompt": "word " * 150, "max_tokens": 20}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "prompt" in _error(raw(url, "POST", "/v1/completions", {"model": "a0"}), 400)["message"]
    assert _error(raw(url, "POST", "/v1/completions", b'{"model": "a0", "prompt": '), 400)["message"]
    _error(raw(url, "POST", "/v1/completions", {**ok, "temperature": 3}), 400)
    _error(raw(url, "POST", "/v1/completions", {**ok, "prompt": ""}), 400)
    _error(raw(url, "POST", "/v1/completions", {**ok, "n": 9}), 400)  # above ServeSettings.max_n
    _error(raw(url, "POST", "/v1/completions", {**ok, "stop": ["a", "b", "c", "d", "e"]}), 400)
    _error(raw(url, "POST", "/v1/completions", {**ok, "prompt": [1, 10**9]}), 400)
    _error(raw(url, "POST", "/v1/chat/completions", {"model": "a0", "messages": []}), 400)
    _error(raw(url, "POST", "/v1/classify", {"model": "a0", "input": "x"}), 400)  # a causal-LM server
    _error(raw(url, "POST", "/v1/completions", b"\xff\xfe not json"), 400)
    assert raw(url, "GET", "/health")[2]["status"] == "ok"  # the server survived all of it


def test_unknown_model_and_route_answer_404(server):
    err = _error(raw(server.url, "POST", "/v1/completions", {"model": "nope", "prompt": "hi"}), 404)
    assert err["code"] == "model_not_found" and "a0" in err["message"]
    _error(raw(server.url, "GET", "/v1/nothing"), 404)
    _error(raw(server.url, "DELETE", "/v1/adapters/nope"), 404)


def test_full_queue_answers_429_with_retry_after(tok, adapter_files):
    srv, engine = _served(tok, adapter_files, max_batch=1, max_queue=1)
    with srv, Gate(engine):
        results: list = []
        body = {"model": "a0", "prompt": "hi", "max_tokens": 4, "temperature": 0}
        first = threading.Thread(target=lambda: results.append(raw(srv.url, "POST", "/v1/completions", body)))
        first.start()
        wait_for(lambda: len(engine.waiting) == 1, 10, "the first request to queue")
        code, headers, err = raw(srv.url, "POST", "/v1/completions", body)
        assert code == 429 and headers["retry-after"] == "1" and err["error"]["code"] == "rate_limit_exceeded"
    first.join(30)
    assert results[0][0] == 200  # the queued one was served once the engine moved on


def test_api_key(tok, adapter_files):
    srv, _ = _served(tok, adapter_files, api_key="s3cret")
    with srv:
        body = {"model": "a0", "prompt": "hi", "max_tokens": 2}
        assert _error(raw(srv.url, "POST", "/v1/completions", body), 401)["code"] == "invalid_api_key"
        _error(raw(srv.url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        _error(raw(srv.url, "GET", "/metrics", headers={"Authorization": "s3cret"}), 401)
        assert raw(srv.url, "GET", "/health")[0] == 200  # liveness stays open
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.completions.create(model="a0", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# -- cancellation and shutdown ---------------------------------------------------------------------------
def _open_stream(url: str, body: dict):
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_disconnect_cancels_the_sequence(server):
    engine = server.engine
    before = engine.stats["cancelled"]
    conn, resp = _open_stream(server.url, {"model": "a1", "prompt": PROMPT, "max_tokens": 64, "temperature": 0})
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # hang up mid-stream
    conn.close()
    wait_for(lambda: engine.stats["cancelled"] > before, 30, "the stream's sequence to be cancelled")
    wait_for(lambda: not engine.active, 30, "the batch to empty")
    # A non-streaming client that gives up while its request waits is cancelled too.
    with Gate(engine):
        with pytest.raises(TimeoutError):
            raw(server.url, "POST", "/v1/completions", {"model": "a1", "prompt": "hi", "max_tokens": 64}, timeout=0.5)
        # Still gated: the handler notices the hang-up and flags the queued sequence before it could run.
        wait_for(lambda: any(s.cancelled for s in engine.waiting), 30, "the handler to flag its sequence")
    wait_for(lambda: engine.stats["cancelled"] > before + 1, 30, "the waiting request to be cancelled")


def test_graceful_shutdown_drains_running_requests(tok, adapter_files):
    srv, engine = _served(tok, adapter_files)
    srv.__enter__()
    conn, resp = _open_stream(srv.url, {"model": "a2", "prompt": PROMPT, "max_tokens": 48, "temperature": 0})
    with Gate(engine):  # the stream is accepted but cannot finish before shutdown starts
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        wait_for(lambda: srv.server.should_exit, 5, "shutdown to begin")
    lines = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    conn.close()
    stopper.join(60)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert not engine._thread.is_alive() and not stopper.is_alive()


# -- hot adapters ----------------------------------------------------------------------------------------
def test_hot_load_and_unload_while_requests_run(server, client, tok, tmp_path, adapter_files):
    extra = save_random_adapters(lambda: tiny_lm(tok), ["hot"], tmp_path)
    ref = tiny_lm(tok)
    lorakit.load_adapter(ref, extra["hot"], "hot", activate=False)
    expected = tok.decode(greedy_reference(ref, "hot", _ids(tok), 8))
    a0_alone = client.completions.create(model="a0", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    streamed: list[str] = []

    def run_a0() -> None:
        chunks = client.completions.create(model="a0", prompt=PROMPT, max_tokens=40, temperature=0, stream=True)
        streamed.append("".join(c.choices[0].text for c in chunks))

    runner = threading.Thread(target=run_a0)
    runner.start()
    wait_for(lambda: any(s.adapter == "a0" for s in server.engine.active), 30, "the a0 request to run")
    assert raw(server.url, "POST", "/v1/adapters", {"name": "hot", "path": extra["hot"]})[0] == 200
    assert client.completions.create(model="hot", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text \
        == expected
    code, _, body = raw(server.url, "DELETE", "/v1/adapters/a0")  # returns once a0's request has finished
    runner.join(60)
    assert code == 200 and body["deleted"] is True
    assert streamed == [a0_alone]  # the running request finished, unchanged by the unload
    assert "a0" not in configs(server.engine.model)
    _error(raw(server.url, "POST", "/v1/completions", {"model": "a0", "prompt": "hi"}), 404)
    # Put a0 back for the other tests in this module, and drop "hot".
    assert raw(server.url, "POST", "/v1/adapters", {"name": "a0", "path": adapter_files["a0"]})[0] == 200
    assert raw(server.url, "DELETE", "/v1/adapters/hot")[0] == 200
    assert client.completions.create(model="a0", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text \
        == a0_alone


def test_bad_adapter_files_are_refused_and_running_adapters_untouched(server, client, tok, tmp_path,
                                                                     adapter_files):
    before = client.completions.create(model="a1", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    src = Path(adapter_files["a1"])
    (corrupt / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes()[:200])
    err = _error(raw(server.url, "POST", "/v1/adapters", {"name": "broken", "path": str(corrupt)}), 400)
    assert "adapter_model.safetensors" in err["message"]
    from transformers import LlamaConfig, LlamaForCausalLM

    def wider() -> LlamaForCausalLM:
        cfg = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
        return LlamaForCausalLM(cfg).eval()

    other = save_random_adapters(wider, ["wide"], tmp_path)
    err = _error(raw(server.url, "POST", "/v1/adapters", {"name": "wide", "path": other["wide"]}), 400)
    assert "hidden_size" in err["message"] or "needs A" in err["message"]
    _error(raw(server.url, "POST", "/v1/adapters", {"name": "gone", "path": str(tmp_path / "missing")}), 400)
    assert raw(server.url, "POST", "/v1/adapters", {"name": "a1", "path": adapter_files["a1"]})[0] == 409
    _error(raw(server.url, "POST", "/v1/adapters", {"name": "not-an-id", "path": adapter_files["a1"]}), 400)
    assert [m.id for m in client.models.list().data] == ["tiny", *NAMES]
    after = client.completions.create(model="a1", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert after == before


# -- observability ---------------------------------------------------------------------------------------
def test_health_and_metrics(server, client):
    client.completions.create(model="a3", prompt=PROMPT, max_tokens=3, temperature=0)
    health = raw(server.url, "GET", "/health")[2]
    assert health["status"] == "ok" and health["model"] == "tiny" and "a3" in health["adapters"]
    code, headers, text = raw(server.url, "GET", "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    metrics = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    assert metrics['lorakit_requests_total{adapter="a3",endpoint="completion"}'] >= 1
    assert metrics["lorakit_queue_depth"] == 0 and "lorakit_active_sequences" in metrics
    assert metrics["lorakit_generated_tokens_total"] >= 3
    assert metrics["lorakit_generated_tokens_per_second"] > 0
    assert metrics["lorakit_time_to_first_token_seconds_count"] >= 1
    assert metrics["lorakit_request_latency_seconds_count"] >= 1


def test_growable_kv_layer_equals_dynamic_layer_and_writes_steps_in_place():
    from transformers.cache_utils import DynamicLayer

    from lorakit.serve.engine import GrowableLayer

    gen = torch.Generator().manual_seed(0)
    grow, plain = GrowableLayer(), DynamicLayer()
    steps = [torch.randn(2, 3, n, 4, generator=gen) for n in (5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)]
    storages = []
    for k in steps:
        got, want = grow.update(k, -k), plain.update(k, -k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert grow.get_seq_length() == plain.get_seq_length()
        storages.append(got[0].untyped_storage().data_ptr())
    # Capacity doubles: 5 -> room for 10 after the first update, 11 -> 22; in between, one buffer is reused.
    assert storages[1:5] == [storages[0]] * 4
    assert len(set(storages)) == 2


def test_batched_layer_left_pads_each_row_like_pad_and_cat():
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicLayer

    from lorakit.serve.engine import _batched_layer

    gen = torch.Generator().manual_seed(1)
    own, lengths = [], [3, 7, 5]
    for n in lengths:
        layer = DynamicLayer()
        layer.update(torch.randn(1, 2, n, 4, generator=gen), torch.randn(1, 2, n, 4, generator=gen))
        own.append(layer)
    batched = _batched_layer(own, lengths, 7)
    for got, name in ((batched.keys, "keys"), (batched.values, "values")):
        want = torch.cat([F.pad(getattr(layer, name), (0, 0, 7 - n, 0)) for layer, n in zip(own, lengths)])
        assert torch.equal(got, want)
    # The next decode step writes in place: spare capacity is there from the start.
    before = batched.keys.untyped_storage().data_ptr()
    batched.update(torch.randn(3, 2, 1, 4, generator=gen), torch.randn(3, 2, 1, 4, generator=gen))
    assert batched.keys.untyped_storage().data_ptr() == before and batched.get_seq_length() == 8
