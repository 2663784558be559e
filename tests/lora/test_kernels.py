"""Every fast path in lorakit.lora.kernels against the plain formula: forward values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, inject, route_rows
from lorakit.lora.kernels import causal_lm_loss, linear_cross_entropy, lora_linear
from lorakit.lora.layers import LoraLayer
from lorakit.lora.weights import AdapterSpec
from tiny import ids, randomize_lora, tiny_gpt2, tiny_llama


def _plain(x, w, bias, a_list, b_list, spans, s, transposed):
    """The unfused reference: base + s·B·A·x written into each pair's output columns."""
    out = x @ w if transposed else x @ w.t()
    if bias is not None:
        out = out + bias
    delta = torch.zeros_like(out)
    for a, b, (start, stop) in zip(a_list, b_list, spans):
        delta[..., start:stop] = (x @ a.t()) @ b.t()
    return out + s * delta


def _leaves(*tensors, grad=True):
    return [t.detach().clone().requires_grad_(grad) for t in tensors]


@pytest.mark.parametrize(
    ("transposed", "spans", "bias_trainable"),
    [
        (False, [(0, 12)], False),
        (False, [(0, 12)], True),
        (True, [(0, 12)], False),
        (True, [(0, 4), (8, 12)], False),  # GPT-2's q and v slices of c_attn
        (True, [(0, 4), (4, 8), (8, 12)], True),
    ],
)
def test_fused_matches_plain_formula_forward_and_gradients(transposed, spans, bias_trainable):
    torch.manual_seed(0)
    d_in, d_out, r = 10, 12, 3
    w = torch.randn(d_in, d_out) if transposed else torch.randn(d_out, d_in)
    bias = torch.randn(d_out)
    a_list = [torch.randn(r, d_in) for _ in spans]
    b_list = [torch.randn(stop - start, r) for start, stop in spans]
    x = torch.randn(2, 5, d_in)
    results = []
    for fn in (lora_linear, None):
        xs, bs = _leaves(x, bias)
        bs.requires_grad_(bias_trainable)
        ws = w.clone()  # frozen
        a_s = _leaves(*a_list)
        b_s = _leaves(*b_list)
        if fn is None:
            out = _plain(xs, ws, bs, a_s, b_s, spans, 0.7, transposed)
        else:
            out = fn(xs, ws, bs, a_s, b_s, spans, 0.7, transposed=transposed)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [xs.grad, *[t.grad for t in a_s], *[t.grad for t in b_s]]
        if bias_trainable:
            grads.append(bs.grad)
        results.append((out.detach(), grads))
    (fast_out, fast_grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(fast_out, ref_out)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_fused_first_layer_input_without_grad_and_2d_input():
    torch.manual_seed(0)
    w, a, b = torch.randn(6, 4), torch.randn(2, 4, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    x = torch.randn(3, 4)
    out = lora_linear(x, w, None, [a], [b], [(0, 6)], 2.0)
    assert out.shape == (3, 6)
    torch.testing.assert_close(out, x @ w.t() + 2.0 * (x @ a.t() @ b.t()))
    out.sum().backward()
    torch.testing.assert_close(a.grad, 2.0 * (torch.ones(3, 6) @ b).t() @ x)


def test_fused_bf16_base_with_fp32_adapter_and_autocast():
    """Precision follows the unfused code: bf16 base + fp32 LoRA term; under autocast both in bf16."""
    torch.manual_seed(0)
    w = torch.randn(8, 16).bfloat16()
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    x = torch.randn(5, 16).bfloat16()
    out = lora_linear(x, w, None, [a], [b], [(0, 8)], 0.5)
    ref = F.linear(x, w) + (0.5 * (x.float() @ a.t() @ b.t())).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)

    xf = torch.randn(5, 16, requires_grad=True)
    a1, b1 = _leaves(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(xf, w.float(), None, [a1], [b1], [(0, 8)], 0.5)
    out.float().sum().backward()
    a2, b2 = _leaves(a, b)
    x2 = xf.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x2, w.float()) + (x2 @ a2.t() @ b2.t()) * 0.5
    ref.float().sum().backward()
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.02)
    for got, want in ((xf.grad, x2.grad), (a1.grad, a2.grad), (b1.grad, b2.grad)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)


def _fallback_forward(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """LoraLayer's unfused path, computed by hand from its modules."""
    weights = layer.adapters[layer.active_adapter]
    return layer.base_layer(x) + weights.delta(x, layer.out_features)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv1d-sliced"])
def test_layer_uses_the_fused_path_and_matches_the_unfused_one(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(6, 9) if kind == "linear" else Conv1D(9, 6)
    base.requires_grad_(False)
    layer = LoraLayer(base)
    slices = ("q", "v") if kind == "conv1d-sliced" else None
    layer.add_adapter("a", AdapterSpec(r=2, scaling=1.5, slices=slices))
    layer.active_adapter = "a"
    for p in layer.adapters["a"].parameters():
        nn.init.normal_(p)
    x = torch.randn(3, 4, 6, requires_grad=True)
    out = layer(x)
    assert "_LoraLinear" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, _fallback_forward(layer, x))
    params = list(layer.adapters["a"].parameters())
    g_fast = torch.autograd.grad(out.square().sum(), [x, *params])
    g_ref = torch.autograd.grad(_fallback_forward(layer, x).square().sum(), [x, *params])
    for got, want in zip(g_fast, g_ref):
        torch.testing.assert_close(got, want)


def test_dropout_and_trainable_base_keep_the_unfused_path():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(4, 4))
    layer.add_adapter("a", AdapterSpec(r=2, scaling=1.0, dropout=0.1))
    layer.active_adapter = "a"
    assert "_LoraLinear" not in type(layer(torch.randn(2, 4)).grad_fn).__name__


@pytest.mark.parametrize(("make", "full"), [(tiny_llama, False), (tiny_gpt2, False), (tiny_llama, True)])
def test_causal_lm_loss_equals_the_model_loss_and_its_gradients(make, full):
    model = make()
    if full:  # every weight trainable, the tied embedding / LM head included
        model.requires_grad_(True)
    else:
        inject(model, LoraConfig(r=4, targets=("q", "v")))
        randomize_lora(model)
    x = ids(batch=3, seq=9)
    mask = torch.ones_like(x)
    mask[0, 7:] = 0
    labels = x.clone()
    labels[:, :4] = -100  # prompt
    labels[0, 7:] = -100  # padding
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(input_ids=x, attention_mask=mask, labels=labels).loss
    g_ref = torch.autograd.grad(ref, params)
    got = causal_lm_loss(model, x, mask, labels)
    g_got = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_routed_rows_use_cached_stacks_that_follow_weight_updates():
    model = tiny_llama()
    for name in ("a", "b"):
        inject(model, LoraConfig(r=2, targets=("q", "v", "o")), name)
    randomize_lora(model)
    x = ids(batch=2, seq=5)
    with torch.no_grad():
        with route_rows(model, ["a", "b"]):
            first = model(x).logits
            again = model(x).logits
        torch.testing.assert_close(first, again)
        layer = model.model.layers[0].self_attn.q_proj
        layer.adapters["b"].B["whole"].add_(1.0)  # bumps _version: the cache must rebuild
        with route_rows(model, ["a", "b"]):
            changed = model(x).logits
    torch.testing.assert_close(changed[0], first[0])
    assert not torch.allclose(changed[1], first[1])


def test_compiles_without_graph_breaks_and_matches_eager():
    model = tiny_llama()
    inject(model, LoraConfig(r=2, targets=("q", "v")))
    randomize_lora(model)
    x = ids(batch=2, seq=6)
    eager = model(x).logits
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # aot_eager also traces the custom Function's backward through AOTAutograd; inductor itself takes
    # about a minute on a 2-core CPU, so the bench (not the tests) exercises it.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x).logits, eager)
    # Gradients through the compiled graph (the custom Function's backward) equal eager ones.
    params = [p for p in model.parameters() if p.requires_grad]
    g_eager = torch.autograd.grad(model(x).logits.square().mean(), params)
    g_comp = torch.autograd.grad(compiled(x).logits.square().mean(), params)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_unfused_in_chunks_with_trainable_head(dtype):
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=True).to(dtype)
    h = torch.randn(13, 8, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    got = linear_cross_entropy(h, head, targets, chunk_elements=200)  # 4 rows per chunk
    g_got = torch.autograd.grad(got * 3.0, [h, head.weight, head.bias])
    ref = F.cross_entropy(head(h).float(), targets)
    g_ref = torch.autograd.grad(ref * 3.0, [h, head.weight, head.bias])
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, ref, **tol)
    for a, b in zip(g_got, g_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_linear_cross_entropy_under_autocast_and_without_grad():
    torch.manual_seed(0)
    head = nn.Linear(8, 40, bias=False).requires_grad_(False)
    h = torch.randn(9, 8, requires_grad=True)
    targets = torch.randint(0, 40, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, head, targets, chunk_elements=100)
        ref = F.cross_entropy(head(h).float(), targets)
    torch.testing.assert_close(got, ref)
    g_got, g_ref = torch.autograd.grad(got, h)[0], torch.autograd.grad(ref, h)[0]
    torch.testing.assert_close(g_got, g_ref, atol=1e-3, rtol=1e-2)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, head, targets), F.cross_entropy(head(h), targets))


def test_fused_trainable_bias_under_autocast_gets_an_fp32_gradient():
    torch.manual_seed(0)
    w, bias = torch.randn(6, 4), torch.randn(6, requires_grad=True)
    a, b = torch.randn(2, 4, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, w, bias, [a], [b], [(0, 6)], 1.0)
    out.float().sum().backward()
    assert bias.grad.dtype == torch.float32
    torch.testing.assert_close(bias.grad, torch.full((6,), 3.0))
