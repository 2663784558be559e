"""The LoRA layer against the paper's closed form, on Linear, Conv1D, fused slices and Embedding."""

import math

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, inject, merge, parameter_report, unmerge
from lorakit.lora.layers import LoraLayer
from lorakit.lora.weights import AdapterSpec
from tiny import ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama


def test_zero_b_gives_exactly_the_base_model():
    for make in (tiny_llama, tiny_gpt2):
        model = make()
        x = ids()
        base = model(x).logits
        inject(model, LoraConfig(targets=("q", "k", "v", "o", "ffn")))
        assert torch.equal(model(x).logits, base)


def test_forward_matches_closed_form_on_linear():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLayer(base)
    layer.add_adapter("a", AdapterSpec(r=3, scaling=2.5))
    layer.active_adapter = "a"
    w = layer.adapters["a"]
    nn.init.normal_(w.B["whole"])
    x = torch.randn(4, 2, 6)
    expected = x @ base.weight.T + base.bias + 2.5 * (x @ w.A["whole"].T @ w.B["whole"].T)
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_is_detected_and_uses_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(5, 6)  # nf=out=5, nx=in=6: weight is (in, out)
    layer = LoraLayer(base)
    assert (layer.kind.name, layer.in_features, layer.out_features) == ("conv1d", 6, 5)
    layer.add_adapter("a", AdapterSpec(r=2, scaling=1.0))
    layer.active_adapter = "a"
    w = layer.adapters["a"]
    nn.init.normal_(w.B["whole"])
    x = torch.randn(3, 6)
    expected = x @ base.weight + base.bias + x @ w.A["whole"].T @ w.B["whole"].T
    torch.testing.assert_close(layer(x), expected)
    layer.merge("a")
    torch.testing.assert_close(layer(x), expected)


def test_fused_c_attn_slices_change_only_q_and_v():
    model = tiny_gpt2()
    x = torch.randn(2, 5, 32)
    c_attn = model.transformer.h[0].attn.c_attn
    before = c_attn(x)
    inject(model, LoraConfig(targets=("q", "v")))
    randomize_lora(model)
    layer = model.transformer.h[0].attn.c_attn
    after = layer(x)
    q, k, v = (after - before).split(32, dim=-1)
    assert q.abs().max() > 1e-3 and v.abs().max() > 1e-3
    assert torch.equal(k, torch.zeros_like(k))  # the key third is untouched, bit for bit
    # Parameters: two (A, B) pairs of r=8 on 32→32 slices per layer.
    assert sum(p.numel() for p in layer.adapters["default"].parameters()) == 2 * 8 * (32 + 32)


def test_embedding_lora_matches_closed_form_and_merges():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4)
    layer = LoraLayer(base)
    layer.add_adapter("a", AdapterSpec(r=2, scaling=0.5))
    layer.active_adapter = "a"
    w = layer.adapters["a"]
    nn.init.normal_(w.B["whole"])
    tokens = torch.tensor([[1, 2, 9], [0, 0, 3]])
    expected = base(tokens) + 0.5 * (w.A["whole"].T[tokens] @ w.B["whole"].T)
    torch.testing.assert_close(layer(tokens), expected)
    layer.merge("a")
    torch.testing.assert_close(layer(tokens), expected)


def test_only_lora_parameters_get_gradients():
    model = tiny_llama()
    inject(model, LoraConfig(targets=("q", "v")))
    model.train()
    out = model(ids(), labels=ids())
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".adapters.default." in n for n in with_grad)
    # B starts at zero, so A's gradient is zero at step 0 but B's is not: the paper's dynamics.
    b_grads = [p.grad for n, p in model.named_parameters() if n.endswith(".B.whole")]
    assert all(g.abs().sum() > 0 for g in b_grads)
    report = parameter_report(model)
    assert report.trainable == 2 * 2 * 8 * (32 + 32) - 2 * 8 * (32 - 16)  # v_proj outputs 16 (2 kv heads × 8)


def test_bias_modes():
    model = tiny_bert()
    inject(model, LoraConfig(targets=("q",), bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith("bias")} == {
        f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)
    }
    model = tiny_bert()
    inject(model, LoraConfig(targets=("q",), bias="all"))
    all_biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    assert len(all_biases) > 10


def test_modules_to_save_trains_a_copy_and_keeps_the_original():
    model = tiny_bert()
    head = model.classifier.weight.detach().clone()
    inject(model, LoraConfig(targets=("q",), modules_to_save=("classifier",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.copies.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    assert torch.equal(model.classifier.original_module.weight, head)


def test_merge_equals_unmerged_and_unmerge_restores_w0():
    model = tiny_llama()
    x = ids()
    inject(model, LoraConfig(targets=("q", "k", "v", "o", "ffn"), r=4))
    randomize_lora(model, std=0.2)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = model(x).logits
    merge(model)
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    assert any(not torch.equal(w0[n], merged_weights[n]) for n in w0)
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=0)
    unmerge(model)
    for n, p in model.named_parameters():
        if n in w0:
            assert (p - w0[n]).abs().max() < 1e-6


def test_merge_in_bf16_uses_fp32_arithmetic():
    torch.manual_seed(0)
    base = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    layer = LoraLayer(base)
    layer.add_adapter("a", AdapterSpec(r=4, scaling=0.01))
    nn.init.normal_(layer.adapters["a"].B["whole"])
    w0 = base.weight.detach().float().clone()
    layer.merge("a")
    expected = (w0 + layer.delta_weight("a")).to(torch.bfloat16)
    assert torch.equal(base.weight, expected)  # one rounding, from the exact fp32 sum


def test_dropout_never_leaks_into_merge():
    model = tiny_llama()
    inject(model, LoraConfig(targets=("q", "v"), dropout=0.5))
    randomize_lora(model)
    model.eval()
    x = ids()
    unmerged = model(x).logits
    merge(model)
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    scaling = layer.adapters["default"].scaling
    a, b = layer.adapters["default"].A["whole"], layer.adapters["default"].B["whole"]
    torch.testing.assert_close(layer.delta_weight("default"), scaling * b @ a)
    # In training mode dropout is active on the unmerged path only.
    unmerge(model)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x).logits, unmerged)


def test_init_options():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(512, 8))
    layer.add_adapter("g", AdapterSpec(r=4, scaling=1, init="gaussian", init_std=0.25))
    layer.add_adapter("k", AdapterSpec(r=4, scaling=1, init="kaiming"))
    assert layer.adapters["g"].A["whole"].std().item() == pytest.approx(0.25, rel=0.05)
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 512
    assert layer.adapters["k"].A["whole"].abs().max() <= bound + 1e-7
    assert all(torch.equal(w.B["whole"], torch.zeros(8, 4)) for w in layer.adapters.values())
