"""``lorakit.serve.decode``: the lean Llama decode step gives the model's own next-token logits and cache
(mixed adapters, left padding, packed and fused weights), and steps aside for anything it does not know."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from lorakit.lora.adapters import route_rows
from lorakit.lora.packed import pack_linears, packing_available
from lorakit.serve.decode import lean_decoder
from serve_util import add_random_adapters
from tiny import llama_config, tiny_gpt2

ROWS = [None, "a", "b", "a"]


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab_size=512, max_position_embeddings=64)).eval()
    add_random_adapters(model, ["a", "b"])
    return model.requires_grad_(False)


def _prefilled(model: LlamaForCausalLM) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """A left-padded batch of four prompts (3 to 9 tokens) prefilled by the model itself: (cache, mask, positions)."""
    lengths = [3, 9, 6, 8]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(row))
        mask[row, -n:] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.no_grad(), route_rows(model, ROWS):
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return cache, mask, torch.tensor([[n] for n in lengths])


def _both_steps(model: LlamaForCausalLM):
    """One decode step through the model's forward and through the lean step, from equal caches."""
    cache, mask, positions = _prefilled(model)
    mask = torch.cat([mask, mask.new_ones(len(ROWS), 1)], dim=1)
    last = torch.tensor([[11], [12], [13], [14]])
    ours, theirs = copy.deepcopy(cache), cache
    step = lean_decoder(model)
    assert step is not None
    with torch.no_grad(), route_rows(model, ROWS):
        expected = model(input_ids=last, attention_mask=mask, position_ids=positions, cache=theirs,
                         use_cache=True, logits_to_keep=1).logits[:, -1]
        got = step(last, positions, mask, ours)
    return got, expected, ours, theirs


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_lean_step_equals_the_model_forward(packed):
    model = _model()
    if packed:
        if not packing_available():
            pytest.skip("this PyTorch build has no oneDNN packed linear")
        pack_linears(model)
    got, expected, ours, theirs = _both_steps(model)
    _close(got, expected)
    assert (expected[1] - expected[2]).abs().max() > 1e-3  # rows with different adapters really differ
    for mine, reference in zip(ours.layers, theirs.layers):
        assert mine.keys.shape == reference.keys.shape
        _close(mine.keys, reference.keys)
        _close(mine.values, reference.values)


def test_lean_step_sees_a_changed_adapter():
    """The step calls the model's own modules: changing an adapter's weights changes its rows' logits."""
    model = _model()
    before = _both_steps(model)[0]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters.a.B." in name:
                param.add_(0.5)
    after, expected, _, _ = _both_steps(model)
    _close(after, expected)
    assert (after[1] - before[1]).abs().max() > 1e-3 and torch.equal(after[0], before[0])


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2


@pytest.mark.parametrize("change", ["gpt2", "hook", "training", "wrapped mlp"])
def test_lean_decoder_declines_what_it_does_not_know(change):
    model = _model()
    if change == "gpt2":
        model = tiny_gpt2().eval()
    elif change == "hook":
        model.model.layers[1].self_attn.register_forward_hook(lambda *args: None)
    elif change == "training":
        model.train()
    else:
        model.model.layers[0].mlp = _Wrapped(model.model.layers[0].mlp)
    assert lean_decoder(model) is None


def test_real_smollm2_lean_step_equals_the_forward(smollm2):
    """SmolLM2-135M, packed and fused weights, two random adapters and the base in one left-padded batch: the
    lean step's next-token logits and greedy tokens equal the forward's."""
    model, _ = smollm2
    add_random_adapters(model, ["a", "b"], std=0.05)
    model.requires_grad_(False)
    if packing_available():
        pack_linears(model)
    got, expected, _, _ = _both_steps(model)
    _close(got, expected)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
