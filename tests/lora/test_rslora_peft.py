"""rsLoRA (scaling alpha/sqrt(r)) round-trips with PEFT's use_rslora both ways, with equal logits."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit import LoraConfig, inject, load_adapter, read_adapter, save_adapter
from tiny import ids, randomize_lora, tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

# Per-module rank and alpha too: PEFT must apply alpha/sqrt(r) with each module's own r and alpha.
RANKS = {r"layers\.1\.self_attn\.v_proj": 2}
ALPHAS = {r"layers\.0\.self_attn\.q_proj": 3.0}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def test_lorakit_rslora_adapter_loads_in_peft_with_equal_logits(tmp_path):
    model = tiny_llama()
    inject(model, LoraConfig(r=8, alpha=4, use_rslora=True, rank_pattern=RANKS, alpha_pattern=ALPHAS))
    randomize_lora(model)
    ours = _logits(model)
    save_adapter(model, tmp_path / "ad")
    assert read_adapter(tmp_path / "ad").raw_config["use_rslora"] is True
    theirs_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    q_proj = theirs_model.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(q_proj.scaling["default"], 3.0 / math.sqrt(8))  # PEFT reads it as rsLoRA
    assert (_logits(theirs_model) - ours).abs().max().item() < 1e-5
    # The scaling matters: the same file read as plain LoRA gives other logits.
    with torch.no_grad():
        for layer in theirs_model.base_model.model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                proj.scaling["default"] *= math.sqrt(proj.r["default"]) / proj.r["default"]
    assert (_logits(theirs_model) - ours).abs().max().item() > 1e-3


def test_peft_rslora_adapter_loads_in_lorakit_with_equal_logits(tmp_path):
    config = peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True,
                             rank_pattern=RANKS, alpha_pattern=ALPHAS, init_lora_weights="gaussian")  # fmt: skip
    peft_model = peft.get_peft_model(tiny_llama(), config)
    randomize_lora(peft_model)
    theirs = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(tiny_llama(), tmp_path / "peft")
    assert read_adapter(tmp_path / "peft").config.scaling_for("model.layers.1.self_attn.v_proj") == 4 / math.sqrt(2)
    assert (_logits(model) - theirs).abs().max().item() < 1e-5
    assert (_logits(tiny_llama()) - theirs).abs().max().item() > 1e-3  # the adapter acts
