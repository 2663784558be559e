"""``lorakit.lora.packed``: frozen linears multiplied through oneDNN-packed weights give the plain fp32 results,
follow in-place weight changes, stay LoRA targets, and step aside under autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.lora import packed
from lorakit.lora.packed import PackedLinear, pack_linears, packing_available, unpack_linears

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN packed linear")


def _tiny_llama():
    from transformers import LlamaForCausalLM

    from tiny import llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(vocab_size=512, max_position_embeddings=64)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _close(a, b):
    """Equal up to fp32 rounding of a different summation order, relative to the logits' scale."""
    torch.testing.assert_close(a, b, atol=2e-5 * float(b.abs().max()), rtol=0)


@pytest.mark.parametrize("rows", [1, 5, 32, 97])
def test_packed_linear_equals_f_linear(rows):
    torch.manual_seed(rows)
    layer = nn.Linear(96, 160).requires_grad_(False)
    x = torch.randn(rows, 7, 96)
    expected = layer(x)
    pack_linears(layer)
    assert type(layer) is PackedLinear and isinstance(layer, nn.Linear)
    with torch.no_grad():
        got = layer(x)
    assert layer._packed is not None  # the packed path really ran
    _close(got, expected)


def test_model_logits_and_state_dict_unchanged():
    model = _tiny_llama().requires_grad_(False)
    ids = torch.randint(0, 512, (3, 11))
    expected, keys = _logits(model, ids), list(model.state_dict())
    converted = pack_linears(model, batch_hint=8)
    assert converted == sum(isinstance(m, nn.Linear) for m in model.modules()) > 0
    _close(_logits(model, ids), expected)
    assert list(model.state_dict()) == keys
    assert unpack_linears(model) == converted
    assert all(type(m) is not PackedLinear for m in model.modules())
    assert not any("_packed" in vars(m) for m in model.modules())
    _close(_logits(model, ids), expected)


def test_lora_on_a_packed_base_and_merge_follow_the_weight():
    """Adapters injected after packing wrap the packed layers; a merge changes W0 in place and the packed
    copy is rebuilt (a stale copy would give the unmerged output)."""
    model = _tiny_llama().requires_grad_(False)
    pack_linears(model)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=("q", "v")), "a")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    model.eval()
    ids = torch.randint(0, 512, (2, 9))
    unmerged = _logits(model, ids)
    lorakit.merge(model)
    merged = _logits(model, ids)
    _close(merged, unmerged)
    assert (merged - _logits(_tiny_llama(), ids)).abs().max() > 1e-3  # the adapter does change the output


def test_grad_path_is_plain_and_trains():
    layer = nn.Linear(8, 4)
    pack_linears(layer)
    assert type(layer) is nn.Linear  # a trainable weight is not packed
    frozen = nn.Linear(8, 4).requires_grad_(False)
    pack_linears(frozen)
    x = torch.randn(3, 8, requires_grad=True)
    frozen(x).sum().backward()  # under autograd the plain F.linear runs: gradients reach the input
    assert x.grad is not None and frozen._packed is None


def test_other_dtypes_and_subclasses_are_left_alone(monkeypatch):
    half = nn.Linear(8, 4).to(torch.bfloat16).requires_grad_(False)

    class Custom(nn.Linear):
        pass

    custom = Custom(8, 4).requires_grad_(False)
    assert pack_linears(nn.Sequential(half, custom)) == 0
    monkeypatch.setattr(packed, "packing_available", lambda: False)
    assert pack_linears(nn.Linear(8, 4).requires_grad_(False)) == 0


def test_real_smollm2_logits(smollm2):
    model, tok = smollm2
    model.requires_grad_(False)
    ids = torch.tensor([tok("name[The Eagle], eatType[coffee shop], food[French] ->").input_ids])
    expected = _logits(model, ids)
    pack_linears(model)
    _close(_logits(model, ids), expected)


def test_shared_input_siblings_are_one_product(monkeypatch):
    """A Llama block's q, k, v (and gate, up) are one product of stacked weights: 4 products a block instead of
    7, with logits unchanged; LoRA injected afterwards still wraps each member."""
    model = _tiny_llama().requires_grad_(False)
    ids = torch.randint(0, 512, (3, 11))
    expected = _logits(model, ids)
    pack_linears(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
    assert mlp.gate_proj.shared is mlp.up_proj.shared is not None and mlp.down_proj.shared is None
    calls = []
    product = packed._packed_product
    monkeypatch.setattr(packed, "_packed_product", lambda *a: calls.append(a[1]) or product(*a))
    _close(_logits(model, ids), expected)
    assert len(calls) == 4 * len(model.model.layers) + 1  # + the LM head
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=("q", "v")), "a")
    model.eval()
    lorakit.set_adapter(model, "a")
    _close(_logits(model, ids), expected)  # B = 0: the adapter adds nothing yet
    assert unpack_linears(model) > 0 and not any("shared" in vars(m) for m in model.modules())


def test_a_member_called_with_another_input_recomputes():
    model = _tiny_llama().requires_grad_(False)
    pack_linears(model)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        attn.q_proj(x)
        _close(attn.k_proj(y), torch.nn.functional.linear(y, attn.k_proj.weight))  # another tensor
        attn.q_proj(x)
        x.mul_(3)  # the same tensor, changed in place
        _close(attn.v_proj(x), torch.nn.functional.linear(x, attn.v_proj.weight))
        first = attn.q_proj(x).clone()
        _close(attn.q_proj(x), first)  # called twice: the second call recomputes, same result
