"""Adapter files: round trips, PEFT layout, atomic writes, and every way a file can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit.io.files as files
import lorakit.io.pairs as pairs
from lorakit import AdapterFileError, LoraConfig, inject, load_adapter, read_adapter, save_adapter, set_adapter
from lorakit.lora.adapters import configs, lora_layers
from tiny import ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama


def _trained(make=tiny_llama, **cfg):
    model = make()
    inject(model, LoraConfig(**({"targets": ("q", "v")} | cfg)))
    randomize_lora(model)
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "make, cfg",
    [
        (tiny_llama, {"targets": ("q", "v", "ffn"), "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 4}}),
        (tiny_gpt2, {"targets": ("q", "v", "o")}),  # per-slice c_attn
        (tiny_bert, {"targets": ("q", "word_embeddings"), "modules_to_save": ("classifier",), "bias": "lora_only"}),
        (tiny_bert, {"targets": ("v",), "bias": "all", "use_rslora": True}),
    ],
)
def test_round_trip_reproduces_outputs(tmp_path, make, cfg):
    model = _trained(make, **cfg)
    x = ids()
    expected = model(x).logits
    save_adapter(model, tmp_path / "ad")
    fresh = make()
    if cfg.get("bias") in ("lora_only", "all"):
        # Trained biases travel in the file; the fresh base starts with its own.
        pass
    load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(x).logits, expected, atol=1e-6, rtol=0)
    assert configs(fresh)["default"].to_dict() | {"modules_to_save": []} == configs(model)["default"].to_dict() | {
        "modules_to_save": []
    }


def test_file_layout_is_peft_s(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 8 and raw["lora_alpha"] == 16
    assert raw["task_type"] == "CAUSAL_LM"
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert set(tensors) == {
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
        for i in range(2)
        for p in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert sorted(raw["target_modules"]) == sorted({k.split(".lora_")[0][len("base_model.model."):] for k in tensors})


def test_sliced_adapters_are_marked_unloadable_for_peft(tmp_path):
    model = _trained(tiny_gpt2)
    save_adapter(model, tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["target_modules"] == [files.PEFT_UNSUPPORTED_TARGET]
    assert raw["lorakit"]["fused_slices"]["transformer.h.0.attn.c_attn"] == ["q", "v"]
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.q.weight" in tensors


def test_several_adapters_loaded_side_by_side(tmp_path):
    model = _trained()
    x = ids()
    out_default = model(x).logits
    save_adapter(model, tmp_path / "a")
    other = _trained(cfg_seed := tiny_llama)  # same base weights (seeded), different LoRA draw
    del cfg_seed
    randomize_lora(other, seed=7)
    out_other = other(x).logits
    save_adapter(other, tmp_path / "b")
    serve = tiny_llama()
    load_adapter(serve, tmp_path / "a", "a")
    load_adapter(serve, tmp_path / "b", "b", activate=False)
    torch.testing.assert_close(serve(x).logits, out_default, atol=1e-6, rtol=0)
    set_adapter(serve, "b")
    torch.testing.assert_close(serve(x).logits, out_other, atol=1e-6, rtol=0)


def test_interrupted_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    model = _trained()
    path = tmp_path / "ad"
    save_adapter(model, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    randomize_lora(model, seed=5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(pairs, "save_file", crash)  # the one writer of safetensors + JSON pairs
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # and no temp litter


def _saved(tmp_path, make=tiny_llama, **cfg):
    path = tmp_path / "ad"
    save_adapter(_trained(make, **cfg), path)
    return path


def _assert_untouched(model, state):
    assert not list(lora_layers(model)) and not configs(model)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_truncated_file_is_named_and_model_untouched(tmp_path):
    path = _saved(tmp_path)
    blob = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    model = tiny_llama()
    state = _state(model)
    with pytest.raises(AdapterFileError, match="checksum"):
        load_adapter(model, path)
    _assert_untouched(model, state)
    # Without the checksum (e.g. a PEFT file) the truncation itself is reported.
    raw = json.loads((path / "adapter_config.json").read_text())
    del raw["lorakit"]["sha256"]
    (path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        load_adapter(model, path)
    _assert_untouched(model, state)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    ],
)
def test_broken_directories(tmp_path, mutate, message):
    path = _saved(tmp_path)
    mutate(path)
    model = tiny_llama()
    state = _state(model)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(model, path)
    _assert_untouched(model, state)


def _rewrite(path, edit_tensors=None, edit_config=None):
    tensors = load_file(path / "adapter_model.safetensors")
    raw = json.loads((path / "adapter_config.json").read_text())
    raw["lorakit"].pop("sha256")
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(raw)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(raw))


def _move_layer_0_to_9(tensors):
    for key in [k for k in tensors if "layers.0.self_attn.q_proj" in k]:
        tensors[key.replace("layers.0", "layers.9")] = tensors.pop(key)


def test_mismatched_files_give_named_errors(tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = [
        (lambda t: t.__setitem__(key, torch.zeros(8, 31)), None, r"q_proj.*A \(8, 31\).*needs A \(8, 32\)"),
        (lambda t: t.pop(key), None, "has no lora_A"),
        (lambda t: t.__setitem__(key, torch.full((8, 32), float("nan"))), None, "NaN"),
        # The config lists layer 0, the tensors moved to layer 9: the missing module is named first.
        (_move_layer_0_to_9, None, r"no tensors for 1 of them: \['model\.layers\.0\.self_attn\.q_proj'\]"),
        (None, lambda c: (c["lorakit"]["config"].__setitem__("r", 4), c.__setitem__("r", 4)), r"with r=4 needs"),
        (None, lambda c: c["lorakit"]["base_model"].__setitem__("hidden_size", 64), "hidden_size=64"),
        (None, lambda c: c.__setitem__("peft_type", "IA3"), "not a LoRA adapter"),
    ]
    for i, (edit_tensors, edit_config, message) in enumerate(cases):
        path = tmp_path / f"case{i}"
        save_adapter(_trained(), path)
        _rewrite(path, edit_tensors, edit_config)
        model = tiny_llama()
        state = _state(model)
        with pytest.raises(AdapterFileError, match=message):
            load_adapter(model, path)
        _assert_untouched(model, state)


def test_loading_an_adapter_for_another_architecture(tmp_path):
    path = _saved(tmp_path, tiny_gpt2)
    with pytest.raises(AdapterFileError, match="model_type='gpt2'"):
        load_adapter(tiny_llama(), path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        read_adapter(tmp_path / "nothing")


def test_saving_keeps_other_files_and_a_torn_pair_is_caught(tmp_path):
    model = _trained()
    path = tmp_path / "run"
    path.mkdir()
    (path / "metrics.jsonl").write_text("{}\n")
    save_adapter(model, path)
    assert (path / "metrics.jsonl").read_text() == "{}\n"
    old_config = (path / "adapter_config.json").read_text()
    randomize_lora(model, seed=9)
    save_adapter(model, path)
    # A crash between the two renames: new weights beside the old config.
    (path / "adapter_config.json").write_text(old_config)
    with pytest.raises(AdapterFileError, match="checksum"):
        load_adapter(tiny_llama(), path)


def test_no_pickle_in_adapter_files(tmp_path):
    path = _saved(tmp_path, tiny_bert, modules_to_save=("classifier",))
    for f in path.iterdir():
        assert b"\x80\x04" not in f.read_bytes()[:2]  # no pickle protocol header
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
