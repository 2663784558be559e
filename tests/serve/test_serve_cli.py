"""`lorakit serve` wiring (arguments → model, adapters, app) and `lorakit info`'s vLLM verdict."""

from __future__ import annotations

import json

import pytest

from lorakit import LoraConfig, inject, save_adapter
from lorakit.cli import main
from lorakit.errors import LorakitError
from tiny import tiny_bert, tiny_gpt2, tiny_llama


def _info(path, capsys) -> dict:
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_says_whether_vllm_can_serve_an_adapter(tmp_path, capsys):
    llama = tiny_llama()
    inject(llama, LoraConfig(targets=("q", "v"), r=4))
    save_adapter(llama, tmp_path / "plain")
    info = _info(tmp_path / "plain", capsys)
    assert info["vllm_servable"] is True and info["vllm_why_not"] == []

    gpt2 = tiny_gpt2()
    inject(gpt2, LoraConfig(targets=("q", "v"), r=4))
    save_adapter(gpt2, tmp_path / "sliced")
    info = _info(tmp_path / "sliced", capsys)
    assert info["vllm_servable"] is False and "per-slice fused" in info["vllm_why_not"][0]

    biased = tiny_llama()
    inject(biased, LoraConfig(targets=("q", "v"), r=32, bias="all"))
    save_adapter(biased, tmp_path / "bias")
    info = _info(tmp_path / "bias", capsys)
    assert "bias='all'" in info["vllm_why_not"][0] and "--max-lora-rank" in info["vllm_notes"][0]
    assert main(["info", str(tmp_path / "plain")]) == 0
    assert "vllm_servable     True" in capsys.readouterr().out


def test_vllm_verdict_loads_a_classifier_head_but_no_other_saved_module(tmp_path, capsys):
    # vLLM PR #53555 (2026): a sequence-classification adapter's score/classifier head in modules_to_save loads
    bert = tiny_bert()
    inject(bert, LoraConfig(targets=("q", "v"), r=4, modules_to_save=("classifier",)))
    save_adapter(bert, tmp_path / "cls")
    info = _info(tmp_path / "cls", capsys)
    assert info["vllm_servable"] is True and info["vllm_why_not"] == []
    assert "PR #53555" in info["vllm_notes"][0]

    bert = tiny_bert()
    inject(bert, LoraConfig(targets=("q", "v"), r=4, modules_to_save=("classifier", "bert.pooler.dense")))
    save_adapter(bert, tmp_path / "pooler")
    info = _info(tmp_path / "pooler", capsys)
    assert info["vllm_servable"] is False
    assert info["vllm_why_not"] == ["modules_to_save ['bert.pooler.dense']: vLLM loads only a sequence-classification "
                                    "adapter's score/classifier head there (merge it with `lorakit merge` instead)"]

    llama = tiny_llama()
    inject(llama, LoraConfig(targets=("q", "v"), r=4, modules_to_save=("lm_head",)))
    save_adapter(llama, tmp_path / "lm_head")
    info = _info(tmp_path / "lm_head", capsys)
    assert info["vllm_servable"] is False and info["vllm_why_not"][0].startswith("modules_to_save ['lm_head']")


def test_serve_command_builds_the_server_from_arguments(tmp_path, smollm2_path):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from transformers import AutoTokenizer

    from lorakit.cli.serve import _parse
    from lorakit.serve.server import BackgroundServer, make_app
    from serve_util import add_random_adapters, tiny_lm

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = tiny_lm(tok)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    add_random_adapters(model, ["x"])
    save_adapter(model, tmp_path / "x", "x")
    base = str(tmp_path / "base")
    args = _parse(["--model", base, "--adapter", f"sql={tmp_path / 'x'}", "--api-key", "k", "--max-tokens-cap", "8"])
    assert args.host == "127.0.0.1"  # loopback unless asked otherwise
    with BackgroundServer(make_app(args)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [base, "sql"]
        assert client.completions.create(model="sql", prompt="hi", max_tokens=8).usage.completion_tokens == 8
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="sql", prompt="hi", max_tokens=9)
    with pytest.raises(LorakitError, match="NAME=DIR"):
        make_app(_parse(["--model", base, "--adapter", "nodir"]))
    with pytest.raises(LorakitError, match="does not exist"):
        make_app(_parse(["--model", base, "--adapter", f"y={tmp_path / 'nothing'}"]))
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
