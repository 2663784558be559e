"""Adapter arithmetic (lorakit.arith.combine): equal to PEFT's add_weighted_adapter, closed forms, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit import LoraConfig, combine_adapters, inject, load_adapter, read_adapter, save_adapter
from lorakit.arith.combine import MODES
from lorakit.cli import main as cli_main
from lorakit.errors import AdapterFileError, ConfigError
from tiny import ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

LOW_RANK = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
WEIGHTS = [0.7, -0.4]
SEED = 1234


def _adapter(path, config, seed, model_fn=tiny_llama):
    model = model_fn()
    inject(model, config)
    randomize_lora(model, seed=seed)
    save_adapter(model, path)
    return path


@pytest.fixture
def same_rank(tmp_path):
    """Two rank-4 adapters with different alphas (one with a per-module alpha)."""
    a = _adapter(tmp_path / "same_a", LoraConfig(r=4, alpha=8), 1)
    b = _adapter(tmp_path / "same_b", LoraConfig(r=4, alpha=16, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 2}), 2)
    return [a, b]


@pytest.fixture
def mixed_rank(tmp_path):
    """Adapters of ranks 4 and 6 with different alphas and a per-module rank."""
    a = _adapter(tmp_path / "mixed_a", LoraConfig(r=4, alpha=8), 1)
    b = _adapter(tmp_path / "mixed_b", LoraConfig(r=6, alpha=3, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}), 2)
    return [a, b]


def _ours(path) -> dict[str, torch.Tensor]:
    """{module: ΔW} of an adapter file, from its tensors and its config's scaling."""
    return {name: (b @ a) * s for name, (a, b, s) in read_adapter(path).lora_matrices().items()}


def _peft_combined(base, paths, mode, monkeypatch, **kwargs):
    """PEFT's combination of ``paths`` ({module: ΔW}, the PeftModel), DARE's draws seeded with SEED.

    PEFT draws DARE's masks from the global generator after initialising the new adapter's weights
    (which draw too); seeding at _freeze_adapter, called between the two, starts the masks at SEED.
    """
    import peft.tuners.lora.model as lora_model

    model = peft.PeftModel.from_pretrained(base, paths[0], adapter_name="in0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"in{i}")
    freeze = lora_model._freeze_adapter
    monkeypatch.setattr(lora_model, "_freeze_adapter", lambda *a: (freeze(*a), torch.manual_seed(SEED)))
    model.add_weighted_adapter([f"in{i}" for i in range(len(paths))], WEIGHTS[: len(paths)], "out",
                               combination_type=mode, svd_full_matrices=False, **kwargs)  # fmt: skip
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "out" in module.lora_A:
            deltas[name] = module.get_delta_weight("out")
    return deltas, model


def _kwargs(mode):
    """Our and PEFT's keyword arguments for ``mode``."""
    ours, theirs = {}, {}
    if MODES[mode].needs_density:
        ours["density"] = theirs["density"] = 0.6
    if MODES[mode].space == "delta":
        ours["rank"] = theirs["svd_rank"] = 3
    return ours, theirs


def _assert_same_deltas(ours, theirs, atol=1e-6):
    assert set(ours) == set(theirs)
    for name in ours:
        scale = theirs[name].abs().max().item()
        assert scale > 1e-4, name  # the combination really holds something
        assert (ours[name] - theirs[name]).abs().max().item() <= atol * max(1.0, scale), name


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_equals_peft(mode, same_rank, mixed_rank, tmp_path, monkeypatch):
    paths = same_rank if mode in LOW_RANK else mixed_rank
    ours_kw, theirs_kw = _kwargs(mode)
    out = combine_adapters(paths, WEIGHTS, tmp_path / "out", mode=mode, seed=SEED, **ours_kw)
    theirs, _ = _peft_combined(tiny_llama(), paths, mode, monkeypatch, **theirs_kw)
    _assert_same_deltas(_ours(out), theirs)


@pytest.mark.parametrize("mode", ["ties", "dare_ties", "ties_svd"])
def test_frequency_sign_election_equals_peft(mode, same_rank, tmp_path, monkeypatch):
    ours_kw, theirs_kw = _kwargs(mode)
    out = combine_adapters(same_rank, WEIGHTS, tmp_path / "out", mode=mode, seed=SEED, majority_sign="frequency",
                           **ours_kw)  # fmt: skip
    theirs, _ = _peft_combined(tiny_llama(), same_rank, mode, monkeypatch, majority_sign_method="frequency",
                               **theirs_kw)  # fmt: skip
    _assert_same_deltas(_ours(out), theirs)


def test_svd_clamp_equals_peft(mixed_rank, tmp_path, monkeypatch):
    out = combine_adapters(mixed_rank, WEIGHTS, tmp_path / "out", mode="svd", rank=3, clamp=0.9)
    theirs, _ = _peft_combined(tiny_llama(), mixed_rank, "svd", monkeypatch, svd_rank=3, svd_clamp=0.9)
    _assert_same_deltas(_ours(out), theirs, atol=1e-5)  # quantile of singular vectors: sign conventions agree


@pytest.mark.parametrize("mode", ["svd", "dare_ties", "cat"])
def test_combined_file_loads_in_lorakit_and_peft_with_equal_logits(mode, same_rank, tmp_path, monkeypatch):
    ours_kw, _ = _kwargs(mode)
    out = combine_adapters(same_rank, WEIGHTS, tmp_path / "out", mode=mode, seed=SEED, **ours_kw)
    x = ids()
    model = load_adapter(tiny_llama(), out)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), out)
    with torch.no_grad():
        ours, theirs, base = model(x).logits, peft_model(x).logits, tiny_llama()(x).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - base).abs().max().item() > 1e-3  # the combined adapter acts


def test_cat_and_full_rank_svd_are_the_weighted_sum_of_deltas(mixed_rank, tmp_path):
    inputs = [_ours(p) for p in mixed_rank]
    expected = {m: sum(w * d[m] for w, d in zip(WEIGHTS, inputs)) for m in inputs[0]}
    cat = combine_adapters(mixed_rank, WEIGHTS, tmp_path / "cat", mode="cat")
    svd = combine_adapters(mixed_rank, WEIGHTS, tmp_path / "svd", mode="svd", rank=10)
    assert read_adapter(cat).config.r == 10  # 4 + 6: ranks add
    for got in (_ours(cat), _ours(svd)):
        for m, dw in expected.items():
            assert torch.allclose(got[m], dw, atol=1e-6), m


def test_truncated_svd_is_the_best_low_rank_approximation(mixed_rank, tmp_path):
    inputs = [_ours(p) for p in mixed_rank]
    out = _ours(combine_adapters(mixed_rank, WEIGHTS, tmp_path / "out", mode="svd", rank=2))
    for m, got in out.items():
        target = sum(w * d[m] for w, d in zip(WEIGHTS, inputs))
        sigma = torch.linalg.svdvals(target)
        assert torch.linalg.matrix_rank(got, atol=1e-6) == 2
        # Eckart–Young: the residual's Frobenius norm² is the sum of the dropped singular values².
        assert math.isclose((target - got).norm() ** 2, (sigma[2:] ** 2).sum().item(), rel_tol=1e-4), m


def test_linear_of_one_adapter_scales_its_delta_exactly(same_rank, tmp_path):
    """sqrt(|w s|) on A times sqrt(|w s|) on B, sign on A only: w·ΔW for a negative weight too."""
    out = _ours(combine_adapters(same_rank[1:], [-2.5], tmp_path / "out", mode="linear"))
    for m, dw in _ours(same_rank[1]).items():
        assert torch.allclose(out[m], -2.5 * dw, atol=1e-6), m


def test_output_scaling_is_one_whatever_the_inputs(tmp_path):
    """rsLoRA / pattern inputs: their scalings fold into the factors; the file says alpha = r, no rsLoRA."""
    a = _adapter(tmp_path / "a", LoraConfig(r=4, alpha=8, use_rslora=True), 1)
    b = _adapter(tmp_path / "b", LoraConfig(r=4, alpha=4, alpha_pattern={"v_proj": 12}), 2)
    out = combine_adapters([a, b], WEIGHTS, tmp_path / "out", mode="cat")
    combined = read_adapter(out)
    assert (combined.config.r, combined.config.alpha, combined.config.use_rslora) == (8, 8.0, False)
    raw = combined.raw_config
    assert (raw["r"], raw["lora_alpha"], raw["use_rslora"], raw["alpha_pattern"]) == (8, 8.0, False, {})
    expected = {m: WEIGHTS[0] * da + WEIGHTS[1] * db for (m, da), db in zip(_ours(a).items(), _ours(b).values())}
    for m, got in _ours(out).items():
        assert torch.allclose(got, expected[m], atol=1e-6), m


def test_dare_masks_follow_the_seed_and_keep_the_density(tmp_path):
    """One adapter through dare_linear_svd at full rank: each ΔW entry is kept (×1/p) with probability p."""
    a = _adapter(tmp_path / "a", LoraConfig(r=4, alpha=8, targets=("q", "v", "o", "ffn")), 1)
    density = 0.3
    runs = [_ours(combine_adapters([a], [1.0], tmp_path / f"o{i}", mode="dare_linear_svd", rank=32,
                                   density=density, seed=seed)) for i, seed in enumerate((5, 5, 6))]  # fmt: skip
    original = _ours(a)
    kept = total = 0
    for m, dw in original.items():
        assert torch.equal(runs[0][m], runs[1][m])  # same seed → same adapter
        got = runs[0][m]
        # Each entry is either dropped (0) or kept and rescaled (ΔW/p), up to the SVD's rounding.
        assert torch.minimum(got.abs(), (got - dw / density).abs()).max().item() < 1e-5, m
        kept += int(((got - dw / density).abs() < got.abs()).sum())
        total += dw.numel()
    assert any(not torch.equal(runs[0][m], runs[2][m]) for m in original)  # another seed → other masks
    # Binomial(total, p): 5 standard deviations either side.
    assert abs(kept - density * total) < 5 * math.sqrt(total * density * (1 - density))


def test_gpt2_fused_slices_combine_slice_by_slice(tmp_path):
    config = LoraConfig(r=2, alpha=4, targets=("q", "v"))
    a = _adapter(tmp_path / "a", config, 1, tiny_gpt2)
    b = _adapter(tmp_path / "b", LoraConfig(r=3, alpha=3, targets=("q", "v")), 2, tiny_gpt2)
    out = combine_adapters([a, b], WEIGHTS, tmp_path / "out", mode="cat")
    inputs, got = [_ours(a), _ours(b)], _ours(out)
    assert set(got) == {f"transformer.h.{i}.attn.c_attn.{s}" for i in range(2) for s in "qv"}
    for m in got:
        assert torch.allclose(got[m], WEIGHTS[0] * inputs[0][m] + WEIGHTS[1] * inputs[1][m], atol=1e-6)
    model = load_adapter(tiny_gpt2(), out)
    with torch.no_grad():
        assert (model(ids()).logits - tiny_gpt2()(ids()).logits).abs().max() > 1e-4
    whole = _adapter(tmp_path / "whole", LoraConfig(r=2, alpha=4, targets=("c_attn",)), 3, tiny_gpt2)
    with pytest.raises(AdapterFileError, match="other modules"):
        combine_adapters([a, whole], None, tmp_path / "bad", mode="cat")


def test_heads_are_refused_unless_one_input_is_named(tmp_path):
    config = LoraConfig(r=2, alpha=4, targets=("q", "v"), modules_to_save=("classifier",))
    a = _adapter(tmp_path / "a", config, 1, tiny_bert)
    b = _adapter(tmp_path / "b", config, 2, tiny_bert)
    with pytest.raises(AdapterFileError, match="modules_to_save"):
        combine_adapters([a, b], None, tmp_path / "out", mode="linear")
    out = combine_adapters([a, b], None, tmp_path / "out", mode="linear", keep_extras_from=1)
    kept, source = read_adapter(out).saved_modules, read_adapter(b).saved_modules
    assert kept.keys() == source.keys() and all(torch.equal(kept[m][k], v) for m in source for k, v in
                                                source[m].items())  # fmt: skip
    model = load_adapter(tiny_bert(), out)
    peft.PeftModel.from_pretrained(tiny_bert(), out)  # PEFT reads the head too
    assert model.classifier.copies["default"].weight.equal(source["classifier"]["weight"])


def test_mismatched_inputs_fail_clearly(same_rank, mixed_rank, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AdapterFileError, match=r"ranks .* differ"):
        combine_adapters(mixed_rank, None, out, mode="linear")
    qk = _adapter(tmp_path / "qk", LoraConfig(r=4, alpha=8, targets=("q", "k")), 3)
    with pytest.raises(AdapterFileError, match="other modules"):
        combine_adapters([same_rank[0], qk], None, out, mode="svd")
    gpt2 = _adapter(tmp_path / "g", LoraConfig(r=4, alpha=8, targets=("q",)), 3, tiny_gpt2)
    with pytest.raises(AdapterFileError, match="another base"):
        combine_adapters([same_rank[0], gpt2], None, out, mode="cat")
    bad = {
        "unknown combination mode": dict(mode="average"),
        "needs a density": dict(mode="ties"),
        "density in": dict(mode="dare_linear", density=0.0),
        "SVD modes only": dict(mode="linear", rank=2),
        "majority_sign": dict(mode="ties", density=0.5, majority_sign="mean"),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ConfigError, match=message):
            combine_adapters(same_rank, None, out, **kwargs)
    with pytest.raises(ConfigError, match="3 weights for 2 adapters"):
        combine_adapters(same_rank, [1, 2, 3], out, mode="cat")
    with pytest.raises(ConfigError, match="one of the inputs"):
        combine_adapters(same_rank, None, same_rank[0], mode="cat", overwrite=True)
    combine_adapters(same_rank, None, out, mode="cat")
    with pytest.raises(ConfigError, match="already holds an adapter"):
        combine_adapters(same_rank, None, out, mode="cat")
    combine_adapters(same_rank, None, out, mode="svd", overwrite=True)
    assert read_adapter(out).config.r == 4


def test_cli_combines_and_reports_errors(same_rank, mixed_rank, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["combine", *map(str, mixed_rank), "--mode", "svd", "--rank", "3", "--weights", "0.5,0.5", "--out"]
    assert cli_main([*argv, str(out)]) == 0
    assert "r=3" in capsys.readouterr().out
    assert read_adapter(out).raw_config["lorakit"]["combined"]["weights"] == [0.5, 0.5]
    assert cli_main(["combine", *map(str, mixed_rank), "--mode", "linear", "--out", str(tmp_path / "x")]) == 1
    assert "ranks" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_equals_peft_on_smollm2(mode, smollm2, tmp_path, monkeypatch):
    from lorakit.io.models import load_model

    model, tok = smollm2
    configs = {"a": LoraConfig(r=8, alpha=16), "b": LoraConfig(r=8 if mode in LOW_RANK else 4, alpha=32)}
    for name, config in configs.items():
        inject(model, config, name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    paths = [save_adapter(model, tmp_path / name, name=name) for name in configs]
    ours_kw, theirs_kw = _kwargs(mode)
    out = combine_adapters(paths, WEIGHTS, tmp_path / "out", mode=mode, seed=SEED, **ours_kw)
    theirs, peft_model = _peft_combined(load_model("smollm2-135m")[0].eval(), paths, mode, monkeypatch, **theirs_kw)
    _assert_same_deltas(_ours(out), theirs, atol=2e-6)
    batch = tok(["The Eagle is a coffee shop near Burger King."], return_tensors="pt")
    peft_model.set_adapter("out")
    with torch.no_grad():
        theirs_logits = peft_model(**batch).logits
        ours_logits = load_adapter(load_model("smollm2-135m")[0].eval(), out)(**batch).logits
    assert (ours_logits - theirs_logits).abs().max().item() < 1e-4


def test_adapters_saved_by_peft_combine_too(tmp_path):
    """PEFT's own files (no lorakit section, target_modules a list of suffixes) combine and load back."""
    paths = []
    for i, alpha in enumerate((8, 2)):
        config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(tiny_llama(), config)
        randomize_lora(model, seed=i + 1)
        model.save_pretrained(tmp_path / f"peft{i}")
        paths.append(tmp_path / f"peft{i}")
    out = combine_adapters(paths, WEIGHTS, tmp_path / "out", mode="cat")
    inputs = [_ours(p) for p in paths]
    for m, got in _ours(out).items():
        assert torch.allclose(got, WEIGHTS[0] * inputs[0][m] + WEIGHTS[1] * inputs[1][m], atol=1e-6), m
    with torch.no_grad():
        ours = load_adapter(tiny_llama(), out)(ids()).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), out)(ids()).logits
    assert (ours - theirs).abs().max().item() < 1e-5
