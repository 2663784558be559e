"""PEFT compatibility both ways, on the real SmolLM2-135M (and MiniLM with a saved classifier head)."""

import pytest
import torch

from lorakit import LoraConfig, inject, load_adapter, save_adapter
from lorakit.io.models import load_model

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

TEXT = ["The Eagle is a coffee shop near Burger King.", "name[Alimentum], area[city centre]"]


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _batch(tok):
    return tok(TEXT, return_tensors="pt", padding=True)


def test_lorakit_adapter_loads_in_peft_with_same_logits(smollm2, tmp_path):
    model, tok = smollm2
    batch = _batch(tok)
    inject(model, LoraConfig(r=8, alpha=16, targets=("q", "v"), rank_pattern={"layers\\.3\\.self_attn\\.v_proj": 4}))
    _randomize(model, 0)
    with torch.no_grad():
        ours = model(**batch).logits
    save_adapter(model, tmp_path / "ad")
    base, _ = load_model("smollm2-135m")
    theirs_model = peft.PeftModel.from_pretrained(base.eval(), tmp_path / "ad")
    with torch.no_grad():
        theirs = theirs_model(**batch).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    with torch.no_grad(), theirs_model.disable_adapter():
        assert (theirs_model(**batch).logits - ours).abs().max().item() > 1e-2  # the adapter really acts


def test_peft_adapter_loads_in_lorakit_with_same_logits(smollm2, tmp_path):
    model, tok = smollm2
    batch = _batch(tok)
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=True,
                             init_lora_weights="gaussian")
    peft_model = peft.get_peft_model(model, config)
    _randomize(peft_model, 1)
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "peft")
    base, _ = load_model("smollm2-135m")
    load_adapter(base.eval(), tmp_path / "peft")
    with torch.no_grad():
        ours = base(**batch).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_seq_cls_with_saved_head_both_ways(minilm_cls, tmp_path):
    model, tok = minilm_cls
    batch = tok(TEXT, return_tensors="pt", padding=True)
    inject(model, LoraConfig(targets=("q", "v"), modules_to_save=("classifier",)))
    _randomize(model, 2)
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(0.5)
        ours = model(**batch).logits
    save_adapter(model, tmp_path / "ours")
    base, _ = load_model("minilm-l6", task="seq-cls", num_labels=2)
    theirs_model = peft.PeftModel.from_pretrained(base.eval(), tmp_path / "ours")
    with torch.no_grad():
        theirs = theirs_model(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # ...and PEFT's save of that model loads back into lorakit.
    theirs_model.save_pretrained(tmp_path / "theirs")
    again, _ = load_model("minilm-l6", task="seq-cls", num_labels=2)
    load_adapter(again.eval(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ours, atol=1e-5, rtol=0)


def test_per_slice_gpt2_adapter_fails_clearly_in_peft(tmp_path):
    from tiny import tiny_gpt2

    model = tiny_gpt2()
    inject(model, LoraConfig(targets=("q", "v")))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="lorakit-per-slice-fused-qkv"):
        peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ad")
