"""Adapter files as untrusted data (issue 29, items 12-13): absurd JSON is one error, and a file is held
to what the installed PEFT accepts when it loads the same file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorakit import AdapterFileError, load_adapter, read_adapter
from lorakit.cli import main
from tiny import tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[1]


def _peft_adapter(path: Path, targets: list[str] | str = ("q_proj", "v_proj")) -> Path:
    """A PEFT-written adapter of a tiny Llama (no lorakit section): the files PEFT users hand us."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


def _set(path: Path, **fields) -> Path:
    config = path / "adapter_config.json"
    raw = json.loads(config.read_text())
    raw.update(fields)
    config.write_text(json.dumps(raw))
    return path


def _peft_verdict(path: Path) -> str:
    """"refused" (PEFT raises), "dropped" (PEFT loads but warns that tensors went unused or layers got
    none) or "loaded" (cleanly), for the adapter loaded into a fresh base."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft.PeftModel.from_pretrained(tiny_llama(), path)
        except Exception:  # any refusal counts: the point is PEFT's verdict
            return "refused"
    return "dropped" if any("adapter keys" in str(w.message) for w in caught) else "loaded"


def _peft_loads(path: Path) -> bool:
    return _peft_verdict(path) == "loaded"


def _lorakit_loads(path: Path) -> bool:
    try:
        load_adapter(tiny_llama(), path)
    except AdapterFileError:
        return False
    return True


# == 12. absurd nesting and size are one error, from the reader itself ======================================
def test_a_config_nested_100000_deep_is_one_error_line_from_info(tmp_path):
    path = _peft_adapter(tmp_path / "ad")
    (path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "lorakit", "info", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit info: error: ") and "nested" in lines[0], lines[-5:]


@pytest.mark.parametrize("depth", [65, 100_000])
def test_the_reader_refuses_deep_nesting_with_an_adapter_file_error(tmp_path, depth):
    path = _peft_adapter(tmp_path / "ad")
    raw = json.loads((path / "adapter_config.json").read_text())
    nest = "[" * depth + "]" * depth
    (path / "adapter_config.json").write_text(json.dumps(raw)[:-1] + f', "x": {nest}}}')
    with pytest.raises(AdapterFileError, match="nested more than 64 levels"):
        read_adapter(path)


def test_the_reader_refuses_an_oversized_config(tmp_path):
    path = _peft_adapter(tmp_path / "ad")
    raw = json.loads((path / "adapter_config.json").read_text())
    raw["padding"] = "x" * (17 << 20)
    (path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterFileError, match="a config may be at most"):
        read_adapter(path)


# == 13. strictness measured against the installed PEFT ===================================================
@pytest.mark.parametrize("targets", ["k_proj", ["k_proj"], ".*\\.k_proj"])
def test_target_modules_contradicting_the_tensors_is_refused_as_peft_does(tmp_path, targets):
    path = _set(_peft_adapter(tmp_path / "ad"), target_modules=targets)  # the tensors are q and v
    # PEFT refuses the string; for the others it adapts k_proj with fresh layers and drops the q/v tensors.
    assert _peft_verdict(path) == ("refused" if targets == "k_proj" else "dropped")
    with pytest.raises(AdapterFileError, match="target_modules"):
        read_adapter(path)


def test_a_string_target_modules_regex_that_covers_the_tensors_loads_in_both(tmp_path):
    path = _set(_peft_adapter(tmp_path / "ad"), target_modules=".*\\.(q_proj|v_proj)")
    assert _peft_loads(path) and _lorakit_loads(path)


@pytest.mark.parametrize("r", [4.7, "4", 4.0, True])
def test_a_rank_that_is_not_an_integer_is_refused_as_peft_does(tmp_path, r):
    path = _set(_peft_adapter(tmp_path / "ad"), r=r)
    if r is not True:  # PEFT takes True as 1 and then fails on the rank-4 tensors: refused either way
        assert not _peft_loads(path)
    with pytest.raises(AdapterFileError, match="r must be a whole number"):
        read_adapter(path)


@pytest.mark.parametrize("alpha", [0, -8, -0.5])
def test_a_zero_or_negative_alpha_loads_as_in_peft(tmp_path, alpha):
    path = _set(_peft_adapter(tmp_path / "ad"), lora_alpha=alpha)
    assert _peft_loads(path) and _lorakit_loads(path)
    assert read_adapter(path).config.scaling_for("model.layers.0.self_attn.q_proj") == alpha / 4


@pytest.mark.parametrize("alpha", ["NaN", "Infinity"])
def test_a_non_finite_alpha_is_refused(tmp_path, alpha):
    path = _peft_adapter(tmp_path / "ad")
    text = (path / "adapter_config.json").read_text()
    raw = json.loads(text)
    raw["lora_alpha"] = math.nan
    (path / "adapter_config.json").write_text(json.dumps(raw).replace("NaN", alpha))
    with pytest.raises(AdapterFileError, match="lora_alpha must be a finite number"):
        read_adapter(path)


def test_info_prints_a_string_target_modules_whole(tmp_path, capsys):
    path = _set(_peft_adapter(tmp_path / "ad"), target_modules=".*\\.(q_proj|v_proj)")
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"] == [".*\\.(q_proj|v_proj)"]
