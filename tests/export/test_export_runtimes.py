"""Per-runtime verdicts for ``lorakit info``: llama.cpp, Ollama, PEFT."""

from __future__ import annotations

from lorakit import LoraConfig, inject, read_adapter, save_adapter
from lorakit.export.runtimes import runtime_verdicts
from tiny import randomize_lora, tiny_gpt2, tiny_llama


def _verdicts(tmp_path, model, **config):
    inject(model, LoraConfig(**config))
    randomize_lora(model)
    return runtime_verdicts(read_adapter(save_adapter(model, tmp_path / "ad")))


def test_plain_llama_lora_is_servable_everywhere(tmp_path):
    verdicts = _verdicts(tmp_path, tiny_llama(), r=2, targets=("q", "v"), use_rslora=True,
                         rank_pattern={"v_proj": 4})
    assert {name: v.servable for name, v in verdicts.items()} == {"llama.cpp": True, "ollama": True, "peft": True}
    assert verdicts["llama.cpp"].route == "lorakit export --format gguf-adapter"


def test_dora_goes_to_llama_cpp_merged_only(tmp_path):
    verdicts = _verdicts(tmp_path, tiny_llama(), r=2, targets=("q",), use_dora=True)
    assert not verdicts["llama.cpp"].servable and not verdicts["ollama"].servable
    assert "model.layers.0.self_attn.q_proj: DoRA magnitude vector" in verdicts["llama.cpp"].why_not[0]
    assert verdicts["ollama"].route == "lorakit export --format gguf (merged)"
    assert verdicts["peft"].servable


def test_gpt2_slices_are_refused_by_peft_and_llama_cpp(tmp_path):
    verdicts = _verdicts(tmp_path, tiny_gpt2(), r=2, targets=("q", "v"))
    assert not verdicts["peft"].servable
    assert verdicts["peft"].why_not[0].startswith("transformer.h.0.attn.c_attn: per-slice")
    assert any("base model_type 'gpt2'" in r for r in verdicts["llama.cpp"].why_not)


def test_report_is_json_ready(tmp_path):
    import json

    model = tiny_llama()
    inject(model, LoraConfig(r=2, targets=("q",)))
    from lorakit.export.runtimes import runtime_report

    report = runtime_report(read_adapter(save_adapter(model, tmp_path / "ad")))
    assert json.loads(json.dumps(report))["peft"]["servable"] is True


def test_info_shows_every_runtimes_verdict(tmp_path, capsys):
    import json

    from lorakit.cli import main

    model = tiny_llama()
    inject(model, LoraConfig(r=2, targets=("q",), use_dora=True))
    folder = save_adapter(model, tmp_path / "ad")
    assert main(["info", str(folder), "--json"]) == 0
    runtimes = json.loads(capsys.readouterr().out)["runtimes"]
    assert (runtimes["llama.cpp"]["servable"], runtimes["peft"]["servable"]) == (False, True)
    assert main(["info", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  llama.cpp no: model.layers.0.self_attn.q_proj: DoRA") for line in lines)
    assert any(line.startswith("  peft      yes: PeftModel.from_pretrained") for line in lines)
