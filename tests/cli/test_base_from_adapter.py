"""`merge`, `generate`, `export` and `serve` without `--model`: the base is the built-in or local folder the
adapter names; an explicit base of another shape stays an error; an adapter naming no usable base asks for
`--model` in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from lorakit import LoraConfig, inject, save_adapter
from lorakit.cli import main
from lorakit.io.bases import base_for
from lorakit.io.models import load_model
from tiny import llama_config, randomize_lora

COMMANDS = ("merge", "generate", "export", "serve")


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    """An adapter saved from the tiny Llama folder, as if trained."""
    model, _ = load_model(tiny_llama)
    inject(model, LoraConfig(r=4, alpha=8, targets=("q", "v")))
    randomize_lora(model, std=0.3)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "ad")


@pytest.fixture(scope="module")
def wider(tiny_llama, tmp_path_factory) -> Path:
    """Another local base: the same tokenizer, hidden size 48 instead of 32."""
    path = tmp_path_factory.mktemp("models") / "wider"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    config = llama_config(hidden_size=48, vocab_size=len(tok), max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _argv(command: str, adapter: Path, out: Path, model: Path | None) -> list[str]:
    """The command's arguments, with ``--model`` only when given."""
    tail = {
        "merge": ["--adapter", str(adapter), "--out", str(out)],
        "generate": ["--adapter", str(adapter), "--max-new-tokens", "4", "name : Aromi ||"],
        "export": ["--adapter", str(adapter), "--format", "hf", "--out", str(out)],
        "serve": ["--adapter", f"ad={adapter}", "--port", "1"],  # fails while loading, before it listens
    }[command]
    return [command, *(["--model", str(model)] if model else []), *tail]


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"lorakit {command}: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_the_adapter_records_a_local_base_as_an_absolute_path(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llama.parent)
    model, _ = load_model(f"./{tiny_llama.name}")  # as a user types it
    inject(model, LoraConfig(r=2, targets=("q",)))
    raw = json.loads((save_adapter(model, tmp_path / "ad") / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == str(tiny_llama) and os.path.isabs(raw["base_model_name_or_path"])
    assert base_for(None, [tmp_path / "ad"]) == str(tiny_llama)


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_without_model_equal_the_explicit_base(command, tiny_llama, trained, tmp_path, one_thread):
    assert main(_argv(command, trained, tmp_path / "explicit", tiny_llama)) == 0
    assert main(_argv(command, trained, tmp_path / "inferred", None)) == 0
    explicit, inferred = _weights(tmp_path / "explicit"), _weights(tmp_path / "inferred")
    assert explicit.keys() == inferred.keys() and len(explicit) > 10
    assert all(torch.equal(explicit[k], inferred[k]) for k in explicit)


def test_generate_without_model_equals_the_explicit_base(tiny_llama, trained, capsys, one_thread):
    assert main(_argv("generate", trained, Path(), tiny_llama)) == 0
    explicit = capsys.readouterr().out
    assert main(_argv("generate", trained, Path(), None)) == 0
    assert capsys.readouterr().out == explicit and explicit.strip()


def test_serve_without_model_serves_the_base_the_adapter_names(tiny_llama, trained, one_thread):
    pytest.importorskip("fastapi")
    from lorakit.cli.serve import _parse
    from lorakit.serve.server import BackgroundServer, make_app
    from serve_util import raw

    texts = []
    for model in ([str(tiny_llama)], []):
        args = _parse([*(["--model", *model] if model else []), "--adapter", f"ad={trained}"])
        app = make_app(args)
        assert app.state.settings.base_name == str(tiny_llama)
        with BackgroundServer(app) as srv:
            status, _, body = raw(srv.url, "POST", "/v1/completions",
                                  {"model": "ad", "prompt": "name : Aromi ||", "max_tokens": 4, "temperature": 0})
            assert status == 200, body
            texts.append(body["choices"][0]["text"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_explicit_base_of_another_shape_stays_an_error(command, wider, trained, tmp_path, capsys, one_thread):
    assert main(_argv(command, trained, tmp_path / "out", wider)) == 1
    line = _error_line(capsys, command)
    assert "hidden_size=32" in line and "48" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("named", ["HuggingFaceTB/SmolLM2-135M", "../tiny-llama", None])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_adapter_naming_no_usable_base_asks_for_model(command, named, trained, tmp_path, capsys):
    planted = tmp_path / "ad"
    shutil.copytree(trained, planted)
    raw = json.loads((planted / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = named
    (planted / "adapter_config.json").write_text(json.dumps(raw))
    assert main(_argv(command, planted, tmp_path / "out", None)) == 1
    line = _error_line(capsys, command)
    assert f"--adapter {planted}" in line and "pass --model NAME_OR_FOLDER" in line
    assert (repr(named) in line) if named else ("names no base" in line)
    assert not (tmp_path / "out").exists()


def test_adapters_naming_different_bases_ask_for_model(tiny_llama, wider, trained, tmp_path, capsys):
    model, _ = load_model(wider)
    inject(model, LoraConfig(r=2, targets=("q",)))
    other = save_adapter(model, tmp_path / "other")
    assert main(["generate", "--adapter", f"a={trained}", "--adapter", f"b={other}",
                 "--default-adapter", "a", "hi"]) == 1
    line = _error_line(capsys, "generate")
    assert "name different bases" in line and str(tiny_llama) in line and str(wider) in line
