"""Many adapters on one base: switch, disable, delete, merge checks, export, mixed-adapter batches."""

import pytest
import torch

from lorakit import (
    LoraConfig,
    MergeError,
    active_adapter,
    delete_adapter,
    disabled,
    inject,
    merge,
    merge_and_unload,
    parameter_report,
    route_rows,
    set_adapter,
    unmerge,
)
from lorakit.lora.adapters import lora_layers
from lorakit.lora.layers import LoraLayer
from tiny import ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama


def _two_adapters(make=tiny_llama, **extra):
    model = make()
    x = ids()
    base = model(x).logits
    inject(model, LoraConfig(targets=("q", "v"), **extra), "a")
    randomize_lora(model, seed=1)
    inject(model, LoraConfig(targets=("q", "k", "o"), r=2, **extra), "b")
    randomize_lora(model, seed=2)
    return model, x, base


def test_switch_disable_delete():
    model, x, base = _two_adapters()
    assert active_adapter(model) == "b"
    out_b = model(x).logits
    set_adapter(model, "a")
    out_a = model(x).logits
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    with disabled(model):
        torch.testing.assert_close(model(x).logits, base)
    torch.testing.assert_close(model(x).logits, out_a)
    # Only the active adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    delete_adapter(model, "a")
    assert active_adapter(model) is None
    torch.testing.assert_close(model(x).logits, base)
    set_adapter(model, "b")
    torch.testing.assert_close(model(x).logits, out_b)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        set_adapter(model, "a")


def test_switching_unmerges_the_merged_adapter():
    model, x, base = _two_adapters()
    set_adapter(model, "a")
    out_a = model(x).logits
    set_adapter(model, "b")
    out_b = model(x).logits
    merge(model)
    set_adapter(model, "a")
    assert all(layer.merged_adapter is None for _, layer in lora_layers(model))
    torch.testing.assert_close(model(x).logits, out_a, atol=1e-5, rtol=0)
    merge(model)
    with disabled(model):
        torch.testing.assert_close(model(x).logits, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x).logits, out_a, atol=1e-5, rtol=0)
    assert all(layer.merged_adapter == "a" for _, layer in lora_layers(model) if "a" in layer.adapters)
    del out_b


def test_checked_merge_refuses_non_finite_weights_and_leaves_model_unmerged():
    model, _, _ = _two_adapters()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.adapters["b"].B["whole"][0, 0] = float("nan")
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(MergeError, match=r"layers\.1\.self_attn\.q_proj.*non-finite"):
        merge(model)
    assert all(layer.merged_adapter is None for _, layer in lora_layers(model))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0)


def test_checked_merge_verifies_a_probe_batch():
    model, x, _ = _two_adapters()
    merge(model, probe=lambda: model(x).logits)  # passes: merged == unmerged
    unmerge(model)
    calls = iter([torch.zeros(1), torch.ones(1)])
    with pytest.raises(MergeError, match="differ from unmerged"):
        merge(model, probe=lambda: next(calls))
    assert all(layer.merged_adapter is None for _, layer in lora_layers(model))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_mixed_batch_equals_each_row_alone(make):
    model, _, _ = _two_adapters(make)
    names = ["a", None, "b", "a"]
    x = ids(batch=4)
    per_row = []
    for row, name in enumerate(names):
        set_adapter(model, name)
        per_row.append(model(x[row : row + 1]).logits)
    with route_rows(model, names):
        mixed = model(x).logits
    torch.testing.assert_close(mixed, torch.cat(per_row), atol=1e-5, rtol=0)
    # Routing ends with the block.
    assert all(layer.row_index is None for _, layer in lora_layers(model))


def test_mixed_batch_routes_saved_heads_and_embeddings():
    model = tiny_bert()
    x = ids(batch=3)
    inject(model, LoraConfig(targets=("q", "word_embeddings"), modules_to_save=("classifier",)), "a")
    randomize_lora(model, seed=1)
    inject(model, LoraConfig(targets=("v",), modules_to_save=("classifier",)), "b")
    randomize_lora(model, seed=2)
    names = ["b", "a", None]
    per_row = []
    for row, name in enumerate(names):
        set_adapter(model, name)
        per_row.append(model(x[row : row + 1]).logits)
    with route_rows(model, names):
        mixed = model(x).logits
    torch.testing.assert_close(mixed, torch.cat(per_row), atol=1e-5, rtol=0)


def test_mixed_batch_many_adapters_in_generate_with_beams():
    model = tiny_llama()
    for i in range(5):
        inject(model, LoraConfig(targets=("q", "v", "o"), r=1 + i), f"t{i}")
        randomize_lora(model, seed=i)
    prompt = ids(batch=3, seq=4)
    names = ["t4", "t0", None]
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=1)
    with route_rows(model, names):
        mixed = model.generate(prompt, **kwargs)
    for row, name in enumerate(names):
        set_adapter(model, name)
        alone = model.generate(prompt[row : row + 1], **kwargs)
        assert torch.equal(mixed[row : row + 1, : alone.shape[1]], alone)


def test_route_rows_sees_layers_injected_or_removed_after_its_last_use():
    """route_rows caches its walk of the model: an adapter injected into new modules after a routed pass,
    or deleted, must be routed (or gone) on the next pass all the same."""
    model = tiny_llama()
    x = ids(batch=2)
    inject(model, LoraConfig(targets=("q",)), "a")
    randomize_lora(model, seed=1)
    with route_rows(model, ["a", "a"]):
        model(x)
    inject(model, LoraConfig(targets=("v", "o")), "b")  # new LoRA layers on v and o
    randomize_lora(model, seed=2)
    names = ["b", "b"]  # uniform rows: the one-adapter path
    set_adapter(model, "b")
    expected = model(x).logits
    with route_rows(model, names):
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=0)
    set_adapter(model, "a")
    expected_a = model(x).logits
    set_adapter(model, "b")  # a layer the routing missed would apply b to every row
    with route_rows(model, ["a", "b"]):
        mixed = model(x).logits
    torch.testing.assert_close(mixed, torch.cat([expected_a[:1], expected[1:]]), atol=1e-5, rtol=0)
    delete_adapter(model, "b")
    with pytest.raises(KeyError, match="unknown adapter"), route_rows(model, names):
        pass
    set_adapter(model, "a")
    expected = model(x).logits
    with route_rows(model, ["a", "a"]):
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=0)


def test_routed_rows_reuse_their_gather_until_routing_or_weights_change():
    """Without grad, each layer keeps its rows' gathered A and B for the same routing (decode steps); a changed
    routing or an adapter changed in place between two passes must give the new result, not the cached rows."""
    model, x = _two_adapters()[:2]
    names = ["a", "b", None]
    x = ids(batch=3)

    def alone(name):
        if name is None:
            with disabled(model):
                return model(x).logits
        set_adapter(model, name)
        return model(x).logits

    with torch.no_grad():
        with route_rows(model, names):
            first = model(x).logits
            layer = next(layer for _, layer in lora_layers(model) if "a" in layer.adapters)
            assert layer._rows_cache is not None  # the gather was kept
            torch.testing.assert_close(model(x).logits, first, atol=0, rtol=0)
            for param in layer.adapters["a"].parameters():
                param.mul_(3)  # in place, inside the same routing
            changed = model(x).logits
        expected = torch.stack([alone(n)[i] for i, n in enumerate(names)])
        torch.testing.assert_close(changed, expected, atol=1e-5, rtol=0)
        assert (changed[0] - first[0]).abs().max() > 1e-4
        with route_rows(model, ["a", "a", "b"]):  # other rows, the same table (None, a, b)
            swapped = model(x).logits
        expected = torch.stack([alone(n)[i] for i, n in enumerate(["a", "a", "b"])])
        torch.testing.assert_close(swapped, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [True, False])
def test_a_routed_layer_gives_each_row_its_own_adapter_as_a_loop_over_rows(grad):
    """Rows of adapters of different ranks (and the base) through one q layer: each row's output equals the
    layer run on that row alone with its adapter, for inputs with and without a position axis, out of place
    (autograd) and in place (serving)."""
    model = tiny_llama()
    for i, r in enumerate((3, 2, 4)):
        inject(model, LoraConfig(targets=("q",), r=r), f"t{i}")
        randomize_lora(model, seed=i)
    layer = model.model.layers[0].self_attn.q_proj
    names = ["t0", "t2", None, "t2", "t1"]
    x = torch.randn(5, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(grad):
        want = []
        for row, name in enumerate(names):
            set_adapter(model, name)
            want.append(layer(x[row : row + 1]))
        with route_rows(model, names):
            got, got_2d = layer(x), layer(x[:, 0])
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_2d, torch.cat(want)[:, 0], atol=1e-5, rtol=0)


def _embedding_adapters():
    model = tiny_bert()
    inject(model, LoraConfig(targets=("q", "word_embeddings")), "a")
    randomize_lora(model, seed=1)
    inject(model, LoraConfig(targets=("v", "word_embeddings"), r=2), "b")
    randomize_lora(model, seed=2)
    return model


@pytest.mark.parametrize("make", [lambda: _two_adapters()[0], lambda: _two_adapters(tiny_gpt2)[0], _embedding_adapters])
@pytest.mark.parametrize(("names", "scales"), [(["a", "a", "a"], None), (["b", "b", "b"], [0.5, 0.5, 0.5]),
                                               (["a", "b", None], None), (["b", "a", None], [2.0, 0.25, 1.0])])
def test_serving_adds_routed_deltas_in_place_as_the_autograd_path_computes_them(make, names, scales, monkeypatch):
    """Without grad, routed rows add B·A·x straight into the base output (one fused multiply-add); with grad
    they take the out-of-place path. Both must give the same outputs: one adapter or mixed rows, scaled or
    not, Linear, GPT-2's fused Conv1D slices and embeddings."""
    model = make()
    x = ids(batch=3)
    in_place = []
    original = LoraLayer._add_routed_delta_
    monkeypatch.setattr(LoraLayer, "_add_routed_delta_", lambda self, *a: in_place.append(original(self, *a))
                        or in_place[-1])
    with route_rows(model, names, scales):
        expected = model(x).logits.detach()
        assert in_place and not any(in_place)  # with grad: the autograd-safe path
        in_place.clear()
        with torch.no_grad():
            served = model(x).logits
    assert in_place and all(in_place)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)


def test_route_rows_rejects_unknown_names_and_merged_models():
    model, _, _ = _two_adapters()
    with pytest.raises(KeyError, match="unknown adapter"), route_rows(model, ["a", "zzz"]):
        pass
    merge(model)
    with pytest.raises(MergeError, match="unmerge"), route_rows(model, ["a", "b"]):
        pass


def test_merge_and_unload_exports_a_plain_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, x, _ = _two_adapters()
    expected = model(x).logits
    merge_and_unload(model)
    assert not list(lora_layers(model))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-5, rtol=0)
    assert not any("lora" in k or "adapters" in k for k in reloaded.state_dict())


def test_parameter_report_counts():
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    inject(model, LoraConfig(targets=("q", "v"), modules_to_save=("classifier",)))
    report = parameter_report(model)
    lora = 2 * 2 * 8 * (32 + 32)
    head = 32 * 3 + 3
    assert report.by_type["LoRA (A, B)"] == (lora, lora)
    assert report.by_type["modules_to_save copy"] == (head, head)
    assert report.trainable == lora + head
    assert report.total == total + lora + head
    assert "trainable" in str(report) and f"{report.trainable:,}" in str(report)


@pytest.mark.parametrize("name", ["training", "keys", "forward"])
def test_inject_refuses_a_modules_attribute_as_adapter_name(name):
    from lorakit.errors import TargetError

    model = tiny_llama()
    with pytest.raises(TargetError, match=f"adapter name '{name}' is reserved"):
        inject(model, LoraConfig(targets=("q", "v")), name)
    assert not list(lora_layers(model))  # nothing half-injected
