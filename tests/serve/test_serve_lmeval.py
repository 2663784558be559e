"""lm-evaluation-harness's `local-completions` model against `lorakit serve` (issue 33): its log-likelihoods
(echo + logprobs over token-id prompts) equal lorakit's own in-process scores of the same model and adapter.

The task is a YAML file over a local JSON file written here; nothing comes from the hub. The server runs
on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("tenacity")  # lm-eval's API models need its [api] extra
lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402

import lorakit  # noqa: E402
from lorakit.serve import adapters_admin  # noqa: E402
from lorakit.serve.app import ServeSettings, create_app  # noqa: E402
from lorakit.serve.engine import Engine  # noqa: E402
from lorakit.serve.server import BackgroundServer  # noqa: E402
from serve_util import save_random_adapters, tiny_lm  # noqa: E402

DOCS = [
    {"question": "name : Alimentum | area : city centre ||",
     "choices": ["The Alimentum is in the city centre.", "Alimentum is not family friendly."], "label": 0},
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a city"], "label": 0},
]
# Summed log-probs of a continuation: fp32 both sides, one prefill on the server, one forward in process.
TOLERANCE = 1e-3


def _task(folder: Path) -> str:
    data = folder / "docs.json"
    data.write_text(json.dumps(DOCS))
    (folder / "task.yaml").write_text(
        "task: lorakit_tiny_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return "lorakit_tiny_ll"


def _in_process(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split (the whole text encoded, the context's tokens cut off) scored by the model itself."""
    whole, ctx = tok(context + continuation).input_ids, tok(context).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = range(len(ctx), len(whole))
    total = sum(float(logp[i - 1, whole[i]]) for i in rows)
    return total, all(int(logp[i - 1].argmax()) == whole[i] for i in rows)


def test_lm_eval_local_completions_loglikelihoods_equal_lorakits(smollm2_path, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    adapter = save_random_adapters(lambda: tiny_lm(tok), ["a0"], tmp_path / "adapters")["a0"]
    served, reference = tiny_lm(tok), tiny_lm(tok)
    for model in (served, reference):
        adapters_admin.load(model, "a0", adapter, "causal-lm")
    lorakit.set_adapter(reference, "a0")
    task = _task(tmp_path)
    engine = Engine(served, tok)
    with BackgroundServer(create_app(engine, ServeSettings(base_name="tiny", max_model_len=200))) as srv:
        results = lm_eval.simple_evaluate(
            model="local-completions", tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)),
            model_args={"base_url": f"{srv.url}/v1/completions", "model": "a0", "tokenizer": smollm2_path,
                        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1,
                        "max_length": 200, "batch_size": 2},
            log_samples=True)  # batch_size 2: two prompts per request, answered as two choices
    samples = results["samples"][task]
    assert len(samples) == len(DOCS)
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            score, greedy = resp[0]
            expected, expected_greedy = _in_process(reference, tok, context, continuation)
            assert score == pytest.approx(expected, abs=TOLERANCE), (context, continuation)
            assert greedy == expected_greedy
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
