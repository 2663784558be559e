"""POST /v1/classify on a sequence-classification server: rows of one request routed to different adapters
(LoRA + their own classifier heads), checked against each adapter run alone."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")

import lorakit
from lorakit.serve import adapters_admin
from lorakit.serve.app import ServeSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.server import BackgroundServer
from serve_util import raw, save_random_adapters, tiny_classifier

TEXTS = ["a wonderful, moving film", "dull and far too long", "it was fine I guess", "the best of the year"]


@pytest.fixture(scope="module")
def tok(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    files = save_random_adapters(lambda: tiny_classifier(tok), ["c0", "c1"], tmp_path_factory.mktemp("cls"),
                                 modules_to_save=("classifier",))
    model = tiny_classifier(tok)
    for name, path in files.items():
        adapters_admin.load(model, name, path, "seq-cls")
    engine = Engine(model, tok)
    app = create_app(engine, ServeSettings(base_name="tiny-cls", task="seq-cls", max_model_len=64))
    reference = tiny_classifier(tok)
    for name, path in files.items():
        lorakit.load_adapter(reference, path, name, activate=False)
    with BackgroundServer(app) as srv:
        yield srv, reference


def _alone(reference, tok, text: str, adapter: str | None) -> list[float]:
    lorakit.set_adapter(reference, adapter)
    with torch.no_grad():
        logits = reference(**tok([text], return_tensors="pt")).logits
    lorakit.set_adapter(reference, None)
    return torch.softmax(logits[0].float(), -1).tolist()


def test_classify_mixed_adapters_per_row(setup, tok):
    srv, reference = setup
    models = ["c0", "c1", "tiny-cls", "c0"]
    code, _, body = raw(srv.url, "POST", "/v1/classify", {"model": models, "input": TEXTS})
    assert code == 200, body
    assert [row["model"] for row in body["data"]] == models
    for row, text, model in zip(body["data"], TEXTS, models):
        expected = _alone(reference, tok, text, None if model == "tiny-cls" else model)
        assert row["scores"] == pytest.approx(expected, abs=1e-5)
        assert row["label_id"] == max(range(3), key=expected.__getitem__)
    # The heads differ per adapter: the same text gets different scores under c0 and c1.
    assert _alone(reference, tok, TEXTS[0], "c0") != pytest.approx(_alone(reference, tok, TEXTS[0], "c1"), abs=1e-3)
    assert body["usage"]["prompt_tokens"] == sum(len(tok(t).input_ids) for t in TEXTS)


def test_classify_errors(setup):
    srv, _ = setup
    assert raw(srv.url, "POST", "/v1/classify", {"model": "nope", "input": "x"})[0] == 404
    assert raw(srv.url, "POST", "/v1/classify", {"model": ["c0"], "input": ["x", "y"]})[0] == 400
    assert raw(srv.url, "POST", "/v1/classify", {"model": "c0", "input": []})[0] == 400
    code, _, body = raw(srv.url, "POST", "/v1/completions", {"model": "c0", "prompt": "x"})
    assert code == 400 and "--task causal-lm" in body["error"]["message"]
    single = raw(srv.url, "POST", "/v1/classify", {"model": "c1", "input": "just one"})
    assert single[0] == 200 and len(single[2]["data"]) == 1
