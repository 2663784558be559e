"""lorakit.lora.arch is the one table of architecture facts: a family registered here reaches targeting,
injection, files, estimates and bottleneck adapters with no other change; the built-in tables match the
real models they describe."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, inject
from lorakit.analysis.arch_counts import FamilyCounts, linear_params, register_counts, unregister_counts
from lorakit.analysis.arch_spec import ArchSpec, arch_from_config, total_params
from lorakit.analysis.estimate import lora_trainable_params
from lorakit.errors import TargetError
from lorakit.io.files import load_adapter, read_adapter, save_adapter
from lorakit.lora import arch
from lorakit.lora.targets import resolve_targets
from lorakit.methods.bottleneck import adapter_sites
from tiny import tiny_bert, tiny_gpt2, tiny_llama


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mix = nn.Linear(d, 3 * d)  # fused query/key/value, as a plain Linear
        self.out = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.mix(x).chunk(3, -1)
        h = x + self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return h + self.down(torch.relu(self.up(h)))


class Toyformer(nn.Module):
    """A model no built-in family knows: blocks under ``stack.<i>``, a fused ``mix`` projection."""

    def __init__(self, d: int = 8, layers: int = 2, vocab: int = 11) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toyformer", num_hidden_layers=layers, hidden_size=d)
        self.embed = nn.Embedding(vocab, d)
        self.stack = nn.ModuleList(_Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.stack:
            h = block(h)
        return self.head(h)


def _toy_counts(spec, attn: int) -> tuple[int, int, int]:
    h, inner = spec.hidden, spec.intermediate
    return attn + linear_params(h, inner, True) + linear_params(inner, h, True), spec.vocab * h, 0


TOY = arch.Family(
    "toy", ("toyformer",), r"stack\.\d+\.",
    {"q": (arch.Site("mix", "q"),), "k": (arch.Site("mix", "k"),), "v": (arch.Site("mix", "v"),),
     "o": (arch.Site("out"),), "ffn": (arch.Site("up"), arch.Site("down"))},
    layer_prefix="stack.{i}.", fused={"mix": arch.QKV_SLICES}, untied_head=True,
)  # fmt: skip
TOY_COUNTS = FamilyCounts(
    read_config=lambda config, model_type: dict(hidden=config["d"], layers=config["n"], heads=1,
                                                intermediate=2 * config["d"], vocab=config["v"], tied_embeddings=False),
    param_counts=_toy_counts,
)  # fmt: skip


@pytest.fixture
def toy_family():
    arch.register(TOY)
    register_counts("toy", TOY_COUNTS)
    yield TOY
    arch.unregister("toy")
    unregister_counts("toy")


def test_an_unknown_family_has_no_aliases_until_registered(toy_family):
    arch.unregister("toy")
    with pytest.raises(TargetError, match="alias 'q' is not defined for model_type 'toyformer'"):
        resolve_targets(Toyformer(), ["q"])
    arch.register(TOY)
    assert resolve_targets(Toyformer(), ["q", "v", "ffn"]) == {
        "stack.0.mix": ("q", "v"), "stack.1.mix": ("q", "v"),
        "stack.0.up": None, "stack.0.down": None, "stack.1.up": None, "stack.1.down": None,
    }  # fmt: skip


def test_a_registered_family_reaches_injection_slices_files_and_merge(toy_family, tmp_path):
    torch.manual_seed(0)
    model = Toyformer().eval()
    ids = torch.randint(0, 11, (2, 5))
    inject(model, LoraConfig(r=2, alpha=4, targets=("q", "v")))
    layer = model.stack[0].mix
    assert layer.adapters["default"].spans == {"q": (0, 8), "v": (16, 24)}  # thirds of the fused 24 outputs
    with torch.no_grad():
        for p in layer.adapters["default"].parameters():
            p.normal_()
    out = model(ids)
    save_adapter(model, tmp_path / "a")
    assert set(read_adapter(tmp_path / "a").pairs["stack.0.mix"]) == {"q", "v"}
    torch.manual_seed(0)
    fresh = Toyformer()  # the same base weights
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh.eval()(ids), out)
    # The delta lands only in the q and v thirds of W0.
    before = layer.base_layer.weight.detach().clone()
    layer.merge("default")
    changed = (layer.base_layer.weight - before).abs().sum(1) > 0
    assert changed[:8].all() and not changed[8:16].any() and changed[16:].all()


def test_a_registered_family_reaches_estimates_and_bottleneck_sites(toy_family):
    spec = arch_from_config({"model_type": "toyformer", "d": 8, "n": 2, "v": 11}, "toy")
    assert (spec.family, spec.hidden, spec.layers) == ("toy", 8, 2)
    # Exact count of the real module's parameters: the estimate formula is the family's.
    model = Toyformer()
    assert total_params(spec) == sum(p.numel() for p in model.parameters())
    # q and v: r·(d_in + d_out) per slice, one slice each, per layer.
    assert lora_trainable_params(spec, "q,v", 2) == 2 * 2 * 2 * (8 + 8)
    assert adapter_sites(model, ("attn", "mlp")) == ["stack.0.out", "stack.0.down", "stack.1.out", "stack.1.down"]
    arch.unregister("toy")
    with pytest.raises(ValueError, match="unknown family 'toy'"):
        ArchSpec("toy", "toy", 8, 2, 1, 16, 11)


def test_register_refuses_a_model_type_of_another_family_and_an_unknown_slice():
    with pytest.raises(ValueError, match="already belongs to family 'llama'"):
        arch.register(arch.Family("x", ("mistral",), r"l\.\d+\.", {}, layer_prefix=""))
    with pytest.raises(ValueError, match="not a fused module"):
        arch.register(arch.Family("y", ("y",), r"l\.\d+\.", {"q": (arch.Site("qkv", "q"),)}, layer_prefix=""))
    assert "x" not in arch.families() and "y" not in arch.families()


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert, tiny_gpt2])
def test_every_builtin_alias_finds_each_of_its_sites_once_per_block(build):
    model = build()
    family = arch.family_of(model)
    layers = model.config.num_hidden_layers
    for alias, sites in family.targets.items():
        resolved = resolve_targets(model, [alias])
        modules = {site.module for site in sites}
        assert len(resolved) == layers * len(modules), alias
        assert all(any(name.endswith("." + m) for m in modules) for name in resolved), alias
        slices = {site.slice for site in sites if site.slice}
        assert all(s is None or set(s) == slices for s in resolved.values()), alias


def test_slice_span_splits_evenly_and_names_a_bad_width():
    assert [arch.slice_span(12, arch.QKV_SLICES, s) for s in "qkv"] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="10 outputs, not divisible into q/k/v"):
        arch.slice_span(10, arch.QKV_SLICES, "q")


def test_head_names_and_pooling_facts_come_from_the_table():
    from lorakit.methods.finetune import HEAD_NAMES

    assert HEAD_NAMES is arch.TASK_HEAD_NAMES
    assert arch.family_for_type("roberta").pools_first_token and not arch.family_for_type("llama").pools_first_token
    assert arch.family("gpt2").peft_modules(["q", "v", "o"]) == ["attn.c_attn", "attn.c_proj"]
