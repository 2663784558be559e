import pytest
from torch import nn

from lorakit import LoraConfig, TargetError, inject
from lorakit.lora.targets import resolve_targets
from tiny import tiny_bert, tiny_gpt2, tiny_llama


def test_llama_aliases():
    got = resolve_targets(tiny_llama(), ["q", "v"])
    assert sorted(got) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert all(s is None for s in got.values())
    ffn = resolve_targets(tiny_llama(), ["ffn"])
    assert len(ffn) == 6 and all(n.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for n in ffn)


def test_bert_aliases_do_not_confuse_attention_output_with_ffn_output():
    model = tiny_bert()
    o = resolve_targets(model, ["o"])
    ffn = resolve_targets(model, ["ffn"])
    assert sorted(o) == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    assert not set(o) & set(ffn)
    assert sorted(ffn) == sorted(
        [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
        + [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    )


def test_gpt2_q_and_v_are_slices_of_c_attn():
    got = resolve_targets(tiny_gpt2(), ["q", "v", "o"])
    assert got["transformer.h.0.attn.c_attn"] == ("q", "v")
    assert got["transformer.h.1.attn.c_proj"] is None
    # Naming the fused module adapts it whole.
    assert resolve_targets(tiny_gpt2(), ["c_attn"])["transformer.h.0.attn.c_attn"] is None


def test_names_suffixes_and_regexes():
    model = tiny_llama()
    assert list(resolve_targets(model, ["model.layers.1.self_attn.o_proj"])) == ["model.layers.1.self_attn.o_proj"]
    assert len(resolve_targets(model, ["o_proj"])) == 2
    assert list(resolve_targets(model, [r"model\.layers\.0\.mlp\.(up|down)_proj"])) == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]


def test_unmatched_target_is_an_error_listing_candidates():
    with pytest.raises(TargetError, match=r"'qproj' matched no module.*self_attn\.q_proj"):
        resolve_targets(tiny_llama(), ["q", "qproj"])


def test_unsupported_module_type_is_named():
    with pytest.raises(TargetError, match=r"RMSNorm.*cannot adapt"):
        resolve_targets(tiny_llama(), ["input_layernorm"])


def test_alias_on_unknown_architecture():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TargetError, match="alias 'q' is not defined"):
        resolve_targets(model, ["q"])


def test_injecting_the_same_adapter_twice_is_an_error():
    model = tiny_llama()
    inject(model, LoraConfig(targets=("q",)))
    with pytest.raises(TargetError, match="already injected"):
        inject(model, LoraConfig(targets=("q",)))
    # Another name on the same modules is fine: that is how several adapters share a base.
    inject(model, LoraConfig(targets=("q",)), "second")
