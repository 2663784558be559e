"""DoRA, PiSSA/OLoRA and the targeting options against closed forms and against PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, inject, merge, unmerge
from lorakit.errors import AdapterFileError, ConfigError, MergeError, TargetError
from lorakit.io.files import load_adapter, read_adapter, save_adapter
from lorakit.lora.adapters import delete_adapter, disabled, route_rows, set_adapter
from lorakit.lora.layers import LoraLayer
from lorakit.lora.targets import resolve_targets
from lorakit.lora.weights import AdapterSpec
from tiny import ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _dora_layer(base: nn.Module, dropout: float = 0.0) -> LoraLayer:
    torch.manual_seed(0)
    layer = LoraLayer(base)
    layer.add_adapter("d", AdapterSpec(r=3, scaling=0.7, dropout=dropout, use_dora=True))
    layer.active_adapter = "d"
    with torch.no_grad():
        for p in layer.adapters["d"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def _closed_form(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    w = layer.base_layer.weight.detach()
    w = w.t() if isinstance(layer.base_layer, Conv1D) else w  # (out, in)
    d = layer.adapters["d"]
    v = w + d.scaling * d.B["whole"] @ d.A["whole"]
    merged = d.magnitude[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)
    return x @ merged.t() + layer.base_layer.bias


@pytest.mark.parametrize("base", [lambda: nn.Linear(6, 5), lambda: Conv1D(5, 6)], ids=["linear", "conv1d"])
def test_dora_equals_the_closed_form_and_merges_and_unmerges(base):
    layer = _dora_layer(base())
    x = torch.randn(4, 6)
    expected = _closed_form(layer, x)
    torch.testing.assert_close(layer(x), expected)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge("d")
    torch.testing.assert_close(layer.base_layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_dora_on_gpt2_fused_slices_merges_to_the_same_outputs():
    x = ids()
    model = tiny_gpt2().eval()
    inject(model, LoraConfig(r=2, targets=("q", "v"), use_dora=True))
    randomize_lora(model)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.adapters["default"].magnitude.shape == (layer.out_features,)
    with torch.no_grad():
        before = model(x).logits
        merge(model, probe=lambda: model(x).logits)  # checked: merged outputs equal unmerged ones
        unmerge(model)
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-4)


def test_dora_starts_at_the_base_model_with_magnitude_the_row_norms():
    base = nn.Linear(6, 5)
    layer = LoraLayer(base)
    layer.add_adapter("d", AdapterSpec(r=2, scaling=1.0, use_dora=True))
    layer.active_adapter = "d"
    torch.testing.assert_close(layer.adapters["d"].magnitude, torch.linalg.norm(base.weight, dim=1))
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))


def test_dora_norm_gets_no_gradient_and_m_a_b_do():
    """Gradients equal the closed form with the row norm detached (DoRA paper §4.3, as PEFT)."""
    layer = _dora_layer(nn.Linear(6, 5))
    d = layer.adapters["d"]
    params = (d.magnitude, d.A["whole"], d.B["whole"])
    x = torch.randn(4, 6)
    layer(x).square().sum().backward()
    grads = [p.grad.clone() for p in params]
    assert all(g.abs().sum() > 0 for g in grads)
    for p in params:
        p.grad = None
    v = layer.base_layer.weight + d.scaling * d.B["whole"] @ d.A["whole"]
    direction = v / torch.linalg.norm(v, dim=1, keepdim=True).detach()
    (x @ (d.magnitude[:, None] * direction).t() + layer.base_layer.bias).square().sum().backward()
    for got, p in zip(grads, params, strict=True):
        torch.testing.assert_close(got, p.grad)


def test_dora_on_an_embedding_is_refused():
    with pytest.raises(TargetError, match="not to embedding layers"):
        LoraLayer(nn.Embedding(5, 4)).add_adapter("d", AdapterSpec(r=2, scaling=1.0, use_dora=True))


def _peft_logits(model, path, x):
    pm = peft.PeftModel.from_pretrained(model, str(path))
    with torch.no_grad():
        return pm(x).logits


@pytest.mark.parametrize("build,targets", [(tiny_llama, ("q", "v")), (tiny_gpt2, ("attn.c_attn", "o"))])
def test_dora_files_round_trip_with_peft_with_equal_logits(build, targets, tmp_path):
    x = ids()
    model = build().eval()
    inject(model, LoraConfig(r=4, alpha=8, targets=targets, use_dora=True))
    randomize_lora(model)
    with torch.no_grad():
        ours = model(x).logits
    save_adapter(model, tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert raw["use_dora"] is True
    torch.testing.assert_close(_peft_logits(build().eval(), tmp_path / "ours", x), ours, atol=1e-5, rtol=1e-4)
    # PEFT's own DoRA adapter, trained-looking, loads into lorakit with equal logits.
    names = sorted({n.rpartition(".")[2] if build is tiny_llama else n for n in (
        ["q_proj", "v_proj"] if build is tiny_llama else ["c_attn", "attn.c_proj"])})
    pm = peft.get_peft_model(build().eval(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=names, use_dora=True,
                                                           fan_in_fan_out=build is tiny_gpt2))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
        theirs = pm(x).logits
    pm.save_pretrained(tmp_path / "peft")
    mine = build().eval()
    load_adapter(mine, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(mine(x).logits, theirs, atol=1e-5, rtol=1e-4)


def test_dora_mixed_batch_rows_equal_each_adapter_alone(tmp_path):
    x = ids(batch=3)
    model = tiny_llama().eval()
    inject(model, LoraConfig(r=2, targets=("q", "v"), use_dora=True), "dora")
    inject(model, LoraConfig(r=2, targets=("q", "v")), "plain")
    for seed, name in enumerate(("dora", "plain")):
        set_adapter(model, name)
        randomize_lora(model, seed=seed)  # each adapter "trained" (randomize touches the active one)
    with torch.no_grad():
        alone = {}
        for name in ("dora", "plain"):
            set_adapter(model, name)
            alone[name] = model(x).logits
        with disabled(model):
            alone[None] = model(x).logits
        with route_rows(model, ["dora", None, "plain"]):
            mixed = model(x).logits
    for row, name in enumerate(["dora", None, "plain"]):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-5)
    assert (alone["dora"] - alone[None]).abs().max() > 1e-2  # the DoRA adapter does change the output


def test_a_dora_file_without_magnitudes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    inject(model, LoraConfig(r=2, targets=("q",), use_dora=True))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "magnitude" not in k}
    save_file(tensors, weights)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    raw["lorakit"].pop("sha256")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterFileError, match="no 1-D lora_magnitude_vector"):
        read_adapter(tmp_path / "a")


# -- PiSSA / OLoRA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_keeps_the_output_and_moves_the_principal_part(init):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    w0 = base.weight.detach().clone()
    layer = LoraLayer(base)
    layer.add_adapter("p", AdapterSpec(r=2, scaling=0.5, init=init))
    d = layer.adapters["p"]
    a, b = d.A["whole"].detach(), d.B["whole"].detach()
    torch.testing.assert_close(base.weight + 0.5 * b @ a, w0, atol=1e-6, rtol=0)  # W0 = W_res + s·B0·A0
    if init == "pissa":  # s·B0·A0 is the best rank-2 approximation of W0
        u, s, vh = torch.linalg.svd(w0)
        torch.testing.assert_close(0.5 * b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5, rtol=0)
    else:  # OLoRA: B0 orthonormal columns (Q), A0 upper-triangular rows of R
        torch.testing.assert_close(b.t() @ b, torch.eye(2), atol=1e-5, rtol=0)
    x = torch.randn(3, 8)
    layer.active_adapter = "p"
    torch.testing.assert_close(layer(x), x @ w0.t() + base.bias, atol=1e-5, rtol=0)
    layer.active_adapter = None  # the base model is W0 again, not the residual
    torch.testing.assert_close(layer(x), x @ w0.t() + base.bias, atol=1e-5, rtol=0)
    layer.delete_adapter("p")
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_matches_peft(init):
    model = tiny_llama()
    inject(model, LoraConfig(r=4, alpha=8, targets=("q", "v"), init=init))
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=init))
    q = model.model.layers[0].self_attn.q_proj
    theirs = pm.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.adapters["default"].A["whole"], theirs.lora_A["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(q.adapters["default"].B["whole"], theirs.lora_B["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(q.base_layer.weight, theirs.base_layer.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_trained_residual_adapter_saves_as_plain_lora_on_the_original_base(init, tmp_path):
    x = ids()
    model = tiny_llama().eval()
    inject(model, LoraConfig(r=2, alpha=4, targets=("q", "v"), init=init))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p) * 0.05)  # "training"
        trained = model(x).logits
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (raw["r"], raw["lora_alpha"], raw["init_lora_weights"]) == (4, 8.0, True)
    assert raw["lorakit"]["converted_from"] == init
    fresh = tiny_llama().eval()  # the ORIGINAL base
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, trained, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_peft_logits(tiny_llama().eval(), tmp_path / "a", x), trained, atol=1e-5, rtol=1e-4)


def test_residual_adapters_refuse_company_and_routing():
    model = tiny_llama()
    inject(model, LoraConfig(r=2, targets=("q",), init="pissa"), "p")
    with pytest.raises(TargetError, match="only adapter"):
        inject(model, LoraConfig(r=2, targets=("q",)), "other")
    with pytest.raises(MergeError, match="PiSSA/OLoRA"), route_rows(model, ["p", None, None]):
        pass
    delete_adapter(model, "p")
    inject(model, LoraConfig(r=2, targets=("q",)), "other")
    with pytest.raises(ConfigError, match="cannot be combined with use_dora"):
        LoraConfig(init="olora", use_dora=True)


def test_merge_of_a_residual_adapter_gives_the_trained_model():
    x = ids()
    model = tiny_llama().eval()
    inject(model, LoraConfig(r=2, targets=("q", "v"), init="pissa"))
    randomize_lora(model)
    with torch.no_grad():
        before = model(x).logits
        merge(model)
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-4)
        unmerge(model)
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-4)


# -- targeting options -------------------------------------------------------------------------------------
def test_all_linear_is_every_linear_layer_but_the_output_head_as_peft():
    model = tiny_llama()
    ours = set(resolve_targets(model, ["all-linear"]))
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs and "lm_head" not in ours and len(ours) == 2 * 7
    bert = set(resolve_targets(tiny_bert(), ["all-linear"]))
    assert "classifier" not in bert and "bert.pooler.dense" in bert


def test_exclude_is_strict_and_removes_modules_or_slices():
    model = tiny_llama()
    got = resolve_targets(model, ["all-linear"], exclude=["mlp.down_proj", "o"])
    assert not any(n.endswith(("down_proj", "o_proj")) for n in got) and len(got) == 2 * 5
    with pytest.raises(TargetError, match="exclude 'k_proj' matches none"):
        resolve_targets(model, ["q"], exclude=["k_proj"])
    gpt2 = resolve_targets(tiny_gpt2(), ["q", "k", "v"], exclude=["k"])
    assert set(gpt2.values()) == {("q", "v")}


def test_layers_keeps_only_those_blocks_and_is_strict(tmp_path):
    model = tiny_llama()
    got = resolve_targets(model, ["q", "v"], layers=(1,))
    assert sorted(got) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(TargetError, match=r"layers \[7\] hold no targeted module"):
        resolve_targets(model, ["q"], layers=(0, 7))
    config = LoraConfig(r=2, targets=("all-linear",), exclude=("mlp",), layers=(0,))
    with pytest.raises(TargetError, match="exclude 'mlp' matches none"):
        inject(model, config)  # "mlp" names the block's MLP module, not a linear layer: strict
    config = LoraConfig(r=2, targets=("all-linear",), exclude=("ffn",), layers=(0,))
    inject(model, config)
    save_adapter(model, tmp_path / "a")
    parsed = read_adapter(tmp_path / "a")
    assert parsed.config == config and len(parsed.pairs) == 4
    with pytest.raises(ConfigError, match="layers must be"):
        LoraConfig(layers=(-1,))


def test_new_fields_stay_out_of_files_that_do_not_use_them(tmp_path):
    model = tiny_llama()
    inject(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "a")
    section = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lorakit"]["config"]
    assert not {"use_dora", "exclude", "layers"} & set(section)


def test_all_linear_skips_modules_trained_in_full_and_an_explicit_overlap_is_refused(tmp_path):
    x = ids()
    model = tiny_bert().eval()
    inject(model, LoraConfig(r=2, targets=("all-linear",), modules_to_save=("classifier", "bert.pooler")))
    randomize_lora(model)
    assert not isinstance(model.bert.pooler.original_module.dense, LoraLayer)
    with torch.no_grad():
        trained = model(x).logits
    save_adapter(model, tmp_path / "a")
    fresh = tiny_bert().eval()
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, trained)
    with pytest.raises(TargetError, match="inside modules_to_save"):
        inject(tiny_bert(), LoraConfig(r=2, targets=("pooler.dense",), modules_to_save=("bert.pooler",)))


def test_vllm_report_names_dora(tmp_path):
    from lorakit.serve.compat import vllm_report

    model = tiny_llama()
    inject(model, LoraConfig(r=2, targets=("q",), use_dora=True))
    save_adapter(model, tmp_path / "a")
    servable, reasons, _ = vllm_report(read_adapter(tmp_path / "a"))
    assert not servable and any("DoRA" in r for r in reasons)
