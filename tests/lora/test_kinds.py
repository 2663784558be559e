"""lorakit.lora.kinds: each layer kind carries its shapes, merge and fast-path choice; a new base type plugs in as
one more kind (the extension point a quantized base uses), and adapter hosts declare their parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, inject, merge, unmerge
from lorakit.errors import TargetError
from lorakit.lora.adapters import parameter_report
from lorakit.lora.kinds import CONV1D, EMBEDDING, LINEAR, LayerKind, adapter_param_names, kind_of, kinds, register_kind
from lorakit.lora.layers import LoraLayer
from lorakit.lora.weights import AdapterSpec
from tiny import tiny_bert


class RoundedLinear(nn.Module):
    """A stand-in for a quantized base: weights held as int8 codes and one fp32 scale, dequantized on use."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        scale = linear.weight.detach().abs().max() / 127
        self.register_buffer("codes", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.full: torch.Tensor | None = None  # a merged weight, kept in fp32 (never re-rounded silently)

    @property
    def weight(self) -> torch.Tensor:
        return self.full if self.full is not None else self.codes.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class RoundedKind(LayerKind):
    name = "rounded-int8"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, RoundedLinear)

    def fast_path(self, base: nn.Module) -> bool:
        return False  # its own forward dequantizes

    def add_to_weight(self, base: nn.Module, dw: torch.Tensor, sign: float = 1.0) -> None:
        merged = base.weight + sign * dw  # dequantize, add in fp32
        base.full = None if sign < 0 else merged  # unmerge returns to the exact codes


@pytest.fixture
def rounded_kind():
    before = kinds()
    register_kind(RoundedKind())
    yield
    import lorakit.lora.kinds as module

    module._KINDS[:] = before


def test_builtin_kinds_read_shapes_from_the_base_weight_and_lay_out_delta_w():
    linear, conv, emb = nn.Linear(6, 4), Conv1D(4, 6), nn.Embedding(6, 4)  # all: in 6, out 4
    assert [kind_of(m) for m in (linear, conv, emb)] == [LINEAR, CONV1D, EMBEDDING]
    for module in (linear, conv, emb):
        kind = kind_of(module)
        assert (kind.in_features(module.weight), kind.out_features(module.weight)) == (6, 4)
        dw = torch.randn(4, 6)
        assert kind.to_base_layout(dw).shape == module.weight.shape
    assert LINEAR.fast_path(linear) and CONV1D.fast_path(conv) and not EMBEDDING.fast_path(emb)
    assert not LINEAR.fast_path(type("Sub", (nn.Linear,), {})(6, 4))  # subclasses keep their own forward
    with pytest.raises(TargetError, match="cannot adapt a LayerNorm"):
        kind_of(nn.LayerNorm(4))


def test_a_registered_kind_adapts_a_new_base_type_with_exact_merge_and_unmerge(rounded_kind):
    torch.manual_seed(0)
    base = RoundedLinear(nn.Linear(6, 5))
    layer = LoraLayer(base)
    assert layer.kind.name == "rounded-int8" and (layer.in_features, layer.out_features) == (6, 5)
    layer.add_adapter("a", AdapterSpec(r=2, scaling=0.5))
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.adapters["a"].B["whole"].normal_()
    w = layer.adapters["a"]
    x = torch.randn(3, 6)
    expected = x @ base.weight.t() + 0.5 * x @ w.A["whole"].t() @ w.B["whole"].t()
    torch.testing.assert_close(layer(x), expected)
    codes = base.codes.clone()
    layer.merge("a")
    torch.testing.assert_close(layer(x), expected)  # merged into fp32 weights, not into the rounded codes
    assert torch.equal(base.codes, codes)
    layer.unmerge()
    assert base.full is None and torch.equal(base.weight, codes.float() * base.scale)  # exactly the codes again
    torch.testing.assert_close(layer(x), expected)


def test_a_registered_kind_is_targetable_in_a_model(rounded_kind):
    model = tiny_bert()
    layer0 = model.bert.encoder.layer[0].attention.self
    layer0.query = RoundedLinear(layer0.query)
    inject(model, LoraConfig(r=2, targets=("q",)))
    assert isinstance(layer0.query, LoraLayer) and layer0.query.kind.name == "rounded-int8"
    merge(model)
    unmerge(model)


def test_adapter_hosts_declare_their_parameters_no_name_matching(tmp_path):
    model = tiny_bert()
    inject(model, LoraConfig(r=2, targets=("q",), modules_to_save=("classifier",)))
    declared = adapter_param_names(model)
    lora = {n for n, label in declared.items() if label == "LoRA (A, B)"}
    copies = {n for n, label in declared.items() if label == "modules_to_save copy"}
    assert lora == {f"bert.encoder.layer.{i}.attention.self.query.adapters.default.{ab}.whole"
                    for i in range(2) for ab in "AB"}  # fmt: skip
    assert copies == {"classifier.copies.default.weight", "classifier.copies.default.bias"}
    report = parameter_report(model)
    assert report.by_type["LoRA (A, B)"][1] == sum(p.numel() for n, p in model.named_parameters() if n in lora)
