"""`lorakit serve` honest for real OpenAI clients (issue 33): cancellation of running sequences, bounded
seeds and clean text, every unimplemented parameter refused with a 400, logprobs and echo.

Servers run on 127.0.0.1 in a thread; every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")

from lorakit.serve import adapters_admin
from lorakit.serve.server import BackgroundServer
from serve_util import Gate, api_error, one_adapter_server, raw, save_random_adapters, tiny_lm, wait_for

PROMPT = "name : Alimentum | area : city centre ||"


def _server(tok, adapter_dir: str, **settings) -> BackgroundServer:
    return one_adapter_server(tok, adapter_dir, 200, **settings)


@pytest.fixture(scope="module")
def server(tok, adapter_dir):
    with _server(tok, adapter_dir) as srv:
        yield srv


_error = api_error


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    code, _, answer = raw(url, "POST", path, body)
    return code, answer


# -- cancellation of a running sequence -----------------------------------------------------------------
def _send_and_hold(url: str, body: dict) -> socket.socket:
    """Send a request and keep the connection open without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_running_sequence_within_a_step(tok, adapter_dir, stream):
    with _server(tok, adapter_dir) as srv:
        engine = srv.engine
        step = engine._decode

        def slow_step() -> None:  # tokens keep flowing, one every 20 ms: never 0.25 s of quiet
            time.sleep(0.02)
            step()

        engine._decode = slow_step
        sock = _send_and_hold(srv.url, {"model": "a0", "prompt": PROMPT, "max_tokens": 180, "temperature": 0,
                                        "stream": stream})
        wait_for(lambda: engine.active and engine.active[0].completion_tokens >= 5, 30, "the sequence to run")
        seq = engine.active[0]
        at_hangup = seq.completion_tokens
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        wait_for(lambda: seq.done, 30, "the sequence to end")
        assert seq.finish_reason == "cancelled"
        # One step may be under way when the hang-up lands, and one more may start before the flag is read.
        assert seq.completion_tokens <= at_hangup + 2, (at_hangup, seq.completion_tokens)
        wait_for(lambda: not engine.active, 30, "the batch to empty")


# -- bounded seeds, Unicode text, and every unimplemented field refused -------------------------------------
def test_a_seed_outside_int64_is_a_400_and_int64_bounds_are_served(server):
    for seed in (2**64, 2**63, -(2**63) - 1):
        err = _error(raw(server.url, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "seed": seed}), 400)
        assert err["param"] == "seed", err
    for seed in (2**63 - 1, -(2**63)):
        code, _, body = raw(server.url, "POST", "/v1/completions",
                            {"model": "tiny", "prompt": "hi", "seed": seed, "max_tokens": 2})
        assert code == 200, body


def _raw_json(url: str, path: str, text: str) -> tuple[int, dict]:
    """POST a JSON text as is (json.dumps cannot write a lone surrogate the way a client can)."""
    code, _, body = raw(url, "POST", path, text.encode())
    return code, body


@pytest.mark.parametrize("path,text,param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "a \\ud800 b"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["\\udfff"]}', "prompt[0]"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": ["\\ud83d"]}', "stop[0]"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800"}]}',
     "messages[0].content"),
])
def test_a_lone_surrogate_in_text_is_a_400(server, path, text, param):
    code, body = _raw_json(server.url, path, text)
    assert code == 400, body
    assert body["error"]["param"] == param and "surrogate" in body["error"]["message"]


# OpenAI's completions and chat fields this server does not implement (each with a value a client would send).
UNIMPLEMENTED = {
    "/v1/completions": {"suffix": "x", "stream_options.bogus": 1, "guided_json": {}, "ignore_eos": True},
    "/v1/chat/completions": {"functions": [{"name": "f"}], "function_call": "auto", "modalities": ["text"],
                             "audio": {"voice": "x"}, "prediction": {"type": "content", "content": "x"},
                             "reasoning_effort": "low", "service_tier": "auto", "store": True,
                             "metadata": {"a": "b"}, "web_search_options": {}, "messages[0].name": "bob"},
}


def _with(body: dict, dotted: str, value) -> dict:
    """``body`` with ``value`` set at a dotted path (``messages[0].name``, ``stream_options.bogus``)."""
    body = json.loads(json.dumps(body))
    *parents, leaf = dotted.split(".")
    node = body
    for part in parents:
        name, _, index = part.partition("[")
        node = node.setdefault(name, {}) if not index else node[name][int(index[:-1])]
    node[leaf] = value
    return body


@pytest.mark.parametrize("path,field", [(p, f) for p, fields in UNIMPLEMENTED.items() for f in fields])
def test_every_unimplemented_field_is_a_400_naming_it_and_null_is_the_default(server, path, field):
    base = ({"model": "tiny", "prompt": "hi", "max_tokens": 2} if path == "/v1/completions" else
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    if field.startswith("stream_options"):
        base["stream_options"] = {"include_usage": True}
        base["stream"] = True
    err = _error(raw(server.url, "POST", path, _with(base, field, UNIMPLEMENTED[path][field])), 400)
    assert err["param"] == field and "not supported" in err["message"], err
    code, _, answer = raw(server.url, "POST", path, _with({**base, "stream": False}, field.split(".")[-1]
                                                          if "." not in field else field, None))
    assert code == 200, answer


def test_user_is_accepted_it_changes_nothing(server):
    code, _, body = raw(server.url, "POST", "/v1/completions",
                        {"model": "tiny", "prompt": "hi", "max_tokens": 2, "user": "someone"})
    assert code == 200, body


# -- logprobs and echo --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tok, adapter_dir):
    """The same tiny model and adapter in process, adapter switched in: what the server's scores must equal."""
    import lorakit

    model = tiny_lm(tok)
    adapters_admin.load(model, "a0", adapter_dir, "causal-lm")
    lorakit.set_adapter(model, "a0")
    return model


def _logp(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_like_the_model_in_process(server, tok, reference):
    ids = tok(PROMPT).input_ids
    for max_tokens in (0, 1):
        code, body = _post(server.url, "/v1/completions", {"model": "a0", "prompt": [ids], "echo": True,
                                                           "logprobs": 2, "max_tokens": max_tokens,
                                                           "temperature": 0})
        assert code == 200, body
        choice = body["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = _logp(reference, ids)
        for i in range(1, len(ids)):
            assert lp["token_logprobs"][i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        for top in lp["top_logprobs"][1:]:
            assert len(top) in (2, 3)  # two alternatives, plus the chosen one when not among them
        assert "".join(lp["tokens"]) == choice["text"]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
        assert choice["text"].startswith(PROMPT)
        assert body["usage"]["completion_tokens"] == max_tokens


def test_completion_logprobs_are_the_greedy_tokens_log_probs(server, tok, reference):
    ids = tok(PROMPT).input_ids
    code, body = _post(server.url, "/v1/completions", {"model": "a0", "prompt": PROMPT, "logprobs": 3,
                                                       "max_tokens": 6, "temperature": 0})
    assert code == 200, body
    lp = body["choices"][0]["logprobs"]
    generated = tok(PROMPT + body["choices"][0]["text"]).input_ids[len(ids):]
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    logp = _logp(reference, ids + generated)
    for i, (value, top) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"])):
        row = logp[len(ids) - 1 + i]
        assert value == pytest.approx(float(row.max()), abs=1e-4)  # greedy: the chosen token is the argmax
        assert len(top) == 3 and max(top.values()) == value
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert lp["text_offset"][0] == 0


def test_streamed_logprobs_equal_the_non_streamed_ones(server):
    request = {"model": "a0", "prompt": PROMPT, "logprobs": 1, "max_tokens": 8, "temperature": 0}
    _, whole = _post(server.url, "/v1/completions", request)
    code, _, text = raw(server.url, "POST", "/v1/completions", {**request, "stream": True})
    assert code == 200
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    values = [v for c in chunks for v in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    offsets = [v for c in chunks for v in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert values == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"])
    assert offsets == whole["choices"][0]["logprobs"]["text_offset"]


def test_chat_logprobs_and_top_logprobs(server):
    request = {"model": "a0", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0,
               "logprobs": True, "top_logprobs": 2}
    code, body = _post(server.url, "/v1/chat/completions", request)
    assert code == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    text = "".join(c["token"] for c in content)
    assert text.startswith(body["choices"][0]["message"]["content"])  # an EOS token may end the list
    for c in content:
        assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"])
        assert bytes(c["bytes"]).decode() == c["token"]
    code, body = _post(server.url, "/v1/chat/completions", {**request, "logprobs": False, "top_logprobs": None})
    assert code == 200 and body["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"echo": True, "stream": True}, "echo"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprob_requests_are_400s_naming_the_field(server, path, extra, param):
    base = ({"model": "tiny", "prompt": "hi"} if path == "/v1/completions" else
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    err = _error(raw(server.url, "POST", path, {**base, **extra}), 400)
    assert err["param"] == param, err


# -- sampling controls, per row inside the batched decode -----------------------------------------------------
def _complete(url: str, **fields) -> dict:
    code, body = _post(url, "/v1/completions", {"model": "a0", "prompt": PROMPT, "max_tokens": 6,
                                                "temperature": 0, **fields})
    assert code == 200, body
    return body


def _ids(tok, body: dict, i: int = 0) -> list[int]:
    return tok(PROMPT + body["choices"][i]["text"]).input_ids[len(tok(PROMPT).input_ids):]


def test_logit_bias_forces_and_bans_tokens(server, tok):
    greedy = _ids(tok, _complete(server.url))
    forced = tok(" hello").input_ids[0]
    assert _ids(tok, _complete(server.url, logit_bias={str(forced): 100}))[:3] == [forced] * 3
    banned = _ids(tok, _complete(server.url, logit_bias={str(greedy[0]): -100}))
    assert banned[0] != greedy[0]


def test_penalties_change_repeats(server, tok, reference):
    greedy = _complete(server.url, max_tokens=24)["choices"][0]["text"]
    for field, value in (("presence_penalty", 2.0), ("frequency_penalty", 2.0), ("repetition_penalty", 2.0)):
        text = _complete(server.url, max_tokens=24, **{field: value})["choices"][0]["text"]
        assert text != greedy, field
    # A frequency penalty is exactly OpenAI's formula: recompute the first penalised step in process.
    body = _complete(server.url, max_tokens=8, frequency_penalty=2.0, logprobs=0)
    ids, prompt = _ids(tok, body), tok(PROMPT).input_ids
    logits = _logp(reference, prompt + ids)  # log-softmax shifts every logit equally: argmax is unchanged
    for step, token in enumerate(ids):
        row = logits[len(prompt) - 1 + step].clone()
        for seen in set(ids[:step]):
            row[seen] -= 2.0 * ids[:step].count(seen)
        assert int(row.argmax()) == token, step


def test_top_k_1_and_min_p_1_are_greedy_at_any_temperature(server, tok):
    greedy = _complete(server.url)["choices"][0]["text"]
    for fields in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in (1, 2, 3):
            assert _complete(server.url, temperature=2.0, seed=seed, **fields)["choices"][0]["text"] == greedy
    # Off values: -1 and 0 leave sampling alone (a seeded sample equals the same seed without top_k).
    plain = _complete(server.url, temperature=1.0, seed=7)["choices"][0]["text"]
    assert _complete(server.url, temperature=1.0, seed=7, top_k=-1)["choices"][0]["text"] == plain


def test_stop_token_ids_end_the_text_without_the_token(server, tok):
    full = _complete(server.url, max_tokens=8)
    ids = _ids(tok, full)
    body = _complete(server.url, max_tokens=8, stop_token_ids=[ids[3]])
    assert body["choices"][0]["finish_reason"] == "stop"
    assert _ids(tok, body) == ids[: ids.index(ids[3])]


def test_max_completion_tokens_bounds_chat(server):
    chat = {"model": "a0", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    for fields, expected in (({"max_completion_tokens": 3}, 3), ({"max_completion_tokens": 2, "max_tokens": 9}, 2)):
        code, body = _post(server.url, "/v1/chat/completions", {**chat, **fields})
        assert code == 200 and body["usage"]["completion_tokens"] <= expected, body
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
    err = _error(raw(server.url, "POST", "/v1/chat/completions", {**chat, "max_completion_tokens": 10**6}), 400)
    assert err["param"] == "max_tokens"


def test_n_choices_are_batched_distinct_and_seeded(server):
    body = _complete(server.url, n=3, temperature=1.0, seed=11, max_tokens=8)
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert [c["text"] for c in _complete(server.url, n=3, temperature=1.0, seed=11, max_tokens=8)["choices"]] == texts
    assert _complete(server.url, temperature=1.0, seed=11, max_tokens=8)["choices"][0]["text"] == texts[0]
    assert body["usage"]["completion_tokens"] == sum(
        _complete(server.url, temperature=1.0, seed=11 + i, max_tokens=8)["usage"]["completion_tokens"]
        for i in range(3))
    code, _, text = raw(server.url, "POST", "/v1/completions", {"model": "a0", "prompt": PROMPT, "max_tokens": 8,
                                                                 "temperature": 1.0, "seed": 11, "n": 3,
                                                                 "stream": True})
    assert code == 200
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    streamed = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == texts


def test_best_of_returns_the_highest_log_prob_per_token(server):
    body = _complete(server.url, n=1, best_of=4, temperature=1.0, seed=5, max_tokens=6)
    candidates = [_complete(server.url, temperature=1.0, seed=5 + i, max_tokens=6, logprobs=0) for i in range(4)]

    def per_token(c: dict) -> float:
        values = c["choices"][0]["logprobs"]["token_logprobs"]
        return sum(values) / len(values)

    top = max(candidates, key=per_token)
    assert body["choices"][0]["text"] == top["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in candidates)


@pytest.mark.parametrize("fields,param", [
    ({"n": 9}, "n"), ({"n": 0}, "n"), ({"best_of": 9}, "best_of"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"temperature": "NaN"}, "temperature"),
])
def test_bad_sampling_values_are_400s_naming_the_field(server, fields, param):
    body = {"model": "a0", "prompt": "hi", "max_tokens": 2, **fields}
    text = json.dumps(body).replace('"NaN"', "NaN")
    code, _, answer = raw(server.url, "POST", "/v1/completions", text.encode())
    assert code == 400, answer
    assert answer["error"]["param"] == param, answer
    assert server.engine.stats["error"] == 0  # nothing reached the engine thread and failed there


def test_several_prompts_give_choices_in_prompt_order(server, tok):
    prompts = [PROMPT, "The capital of France is", "hello there"]
    body = _complete(server.url, prompt=prompts, n=2, temperature=1.0, seed=3, max_tokens=5)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for p, prompt in enumerate(prompts):
        alone = _complete(server.url, prompt=prompt, n=2, temperature=1.0, seed=3, max_tokens=5)
        assert [c["text"] for c in body["choices"][2 * p : 2 * p + 2]] == [c["text"] for c in alone["choices"]]
    assert body["usage"]["prompt_tokens"] == sum(len(tok(p).input_ids) for p in prompts)
    as_ids = _complete(server.url, prompt=[tok(p).input_ids for p in prompts], n=2, temperature=1.0, seed=3,
                       max_tokens=5)
    assert [c["text"] for c in as_ids["choices"]] == [c["text"] for c in body["choices"]]
    err = _error(raw(server.url, "POST", "/v1/completions", {"model": "a0", "prompt": ["hi"] * 33}), 400)
    assert err["param"] == "prompt" and "at most 32" in err["message"]


# -- per-request lora_scale -------------------------------------------------------------------------------------
def test_lora_scale_scales_the_adapter_per_row_in_a_mixed_batch(server, tok, adapter_dir):
    import torch

    import lorakit

    ids = tok(PROMPT).input_ids

    def reference_logprobs(scale: float) -> list[float]:
        """The prompt's scores in process with the adapter's B matrices times ``scale``."""
        model = tiny_lm(tok)
        adapters_admin.load(model, "a0", adapter_dir, "causal-lm")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapters.a0.B." in name:
                    p.mul_(scale)
        lorakit.set_adapter(model, "a0")
        logp = _logp(model, ids)
        return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]

    def served(scale: float) -> list[float]:
        body = _complete(server.url, prompt=[ids], echo=True, logprobs=0, max_tokens=0, lora_scale=scale)
        return body["choices"][0]["logprobs"]["token_logprobs"][1:]

    full, half, zero = served(1.0), served(0.5), served(0.0)
    assert half != full and half == pytest.approx(reference_logprobs(0.5), abs=1e-4)
    assert zero == pytest.approx(served_base(server, ids), abs=1e-5)
    # In one batch: rows at different scales of the same adapter each get their own (greedy, 8 tokens).
    alone = {s: _complete(server.url, max_tokens=8, lora_scale=s)["choices"][0]["text"] for s in (0.0, 0.5, 2.0)}
    results: dict = {}
    with Gate(server.engine):
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(
            s, _complete(server.url, max_tokens=8, lora_scale=s)["choices"][0]["text"])) for s in alone]
        for t in threads:
            t.start()
        wait_for(lambda: len(server.engine.waiting) == 3, 30, "three queued requests")
    for t in threads:
        t.join(60)
    assert results == alone and len(set(alone.values())) > 1


def served_base(server, ids: list[int]) -> list[float]:
    body = _complete(server.url, model="tiny", prompt=[ids], echo=True, logprobs=0, max_tokens=0)
    return body["choices"][0]["logprobs"]["token_logprobs"][1:]


@pytest.mark.parametrize("fields,param", [
    ({"model": "tiny", "lora_scale": 0.5}, "lora_scale"), ({"lora_scale": -1}, "lora_scale"),
    ({"lora_scale": 11}, "lora_scale"),
])
def test_bad_lora_scales_are_400s(server, fields, param):
    err = _error(raw(server.url, "POST", "/v1/completions", {"model": "a0", "prompt": "hi", **fields}), 400)
    assert err["param"] == param, err


def test_lora_scale_is_refused_for_dora_adapters(server, tok, tmp_path):
    path = save_random_adapters(lambda: tiny_lm(tok), ["d0"], tmp_path, use_dora=True)["d0"]
    assert raw(server.url, "POST", "/v1/adapters", {"name": "d0", "path": path})[0] == 200
    try:
        err = _error(raw(server.url, "POST", "/v1/completions",
                         {"model": "d0", "prompt": "hi", "max_tokens": 2, "lora_scale": 0.5}), 400)
        assert err["param"] == "lora_scale" and "DoRA" in err["message"]
        assert raw(server.url, "POST", "/v1/completions", {"model": "d0", "prompt": "hi", "max_tokens": 2})[0] == 200
    finally:
        raw(server.url, "DELETE", "/v1/adapters/d0")
