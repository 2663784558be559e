"""Hostile and unlucky inputs (issue 15): bounded pattern matching, non-finite values refused everywhere,
adapters never lost to a kill, and one-line lorakit errors instead of tracebacks."""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import AdapterFileError, ConfigError, LoraConfig, TargetError, inject, read_adapter, save_adapter
from lorakit.cli import main
from lorakit.lora.targets import resolve_targets
from tiny import randomize_lora, tiny_bert, tiny_llama

REPO = Path(__file__).resolve().parents[1]
EVIL = "(.+)+X"  # exponential for a backtracking matcher on any name without an X


@pytest.fixture
def watchdog():
    """Abort the whole test process (with a traceback) if a test hangs: a backtracking regex cannot be
    interrupted by signals, so a hang would otherwise stall the suite instead of failing it."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _saved(path: Path, model=None, **cfg) -> Path:
    model = model if model is not None else tiny_llama()
    inject(model, LoraConfig(**({"targets": ("q", "v")} | cfg)))
    randomize_lora(model)
    save_adapter(model, path)
    return path


def _edit(path: Path, tensors=None, config=None) -> None:
    """Rewrite an adapter as an attacker would: edit tensors and/or config, keep the checksum valid."""
    from lorakit.io.files import _sha256

    weights, config_path = path / "adapter_model.safetensors", path / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    if tensors:
        t = load_file(weights)
        tensors(t)
        save_file(t, weights)
    if config:
        config(raw)
    if "lorakit" in raw:
        raw["lorakit"]["sha256"] = _sha256(weights)
    config_path.write_text(json.dumps(raw))


def _smollm2_module_names() -> list[str]:
    """Every module name of SmolLM2-135M, from its config on the meta device (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.io.models import model_path

    config = AutoConfig.from_pretrained(model_path("smollm2-135m"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, _ in model.named_modules() if n]


# == 1. patterns: linear time, invalid ones are lorakit errors ===========================================
def test_evil_patterns_over_every_smollm2_module_name_take_well_under_2s(watchdog):
    names = _smollm2_module_names()
    assert len(names) > 200
    config = LoraConfig(rank_pattern={EVIL: 4}, alpha_pattern={EVIL: 2.0})
    start = time.perf_counter()
    ranks = [config.rank_for(n) for n in names] + [config.alpha_for(n) for n in names]
    from lorakit.lora.targets import _matches_plain

    hits = [n for n in names if _matches_plain(EVIL, n)]
    elapsed = time.perf_counter() - start
    assert set(ranks) == {8, 16.0} and not hits  # nothing ends in X
    assert elapsed < 2.0, f"{elapsed:.2f}s"


def test_evil_target_is_resolved_in_bounded_time(watchdog):
    with pytest.raises(TargetError, match="matched no module"):
        resolve_targets(tiny_llama(), [EVIL])


@pytest.mark.parametrize("section", ["peft", "lorakit"])
def test_info_eval_merge_do_not_hang_on_evil_patterns_from_a_file(tmp_path, section, watchdog):
    path = _saved(tmp_path / "ad")

    def plant(raw):
        raw["rank_pattern"] = raw["lorakit"]["config"]["rank_pattern"] = {EVIL: 8}
        raw["alpha_pattern"] = raw["lorakit"]["config"]["alpha_pattern"] = {EVIL: 4.0}
        if section == "peft":  # a PEFT file: no lorakit section at all
            del raw["lorakit"]

    _edit(path, config=plant)
    # A subprocess, because a hang in the regex engine cannot be interrupted from inside.
    code = "import sys; from lorakit.cli import main; sys.exit(main(['info', sys.argv[1], '--json']))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ranks"] == [8]
    parsed = read_adapter(path)
    assert parsed.config.alpha_for("model.layers.0.self_attn.q_proj") == 16.0
    # eval and merge load the adapter: injection computes every module's rank and scaling.
    from lorakit import load_adapter, merge_and_unload

    merge_and_unload(load_adapter(tiny_llama(), path))


@pytest.mark.parametrize("bad", ["query[", "(?=q)_proj", "q_proj{1001}"])
def test_invalid_patterns_are_lorakit_errors(bad, tmp_path, capsys):
    with pytest.raises(TargetError, match="not a valid regular expression"):
        resolve_targets(tiny_llama(), [bad])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        LoraConfig(rank_pattern={bad: 2})
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,0\n")
    rc = main(["train", "--task", "text", "--train-file", str(data), "--targets", bad, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("lorakit train: error: target pattern") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_overlong_pattern_is_refused():
    with pytest.raises(ConfigError, match="longer than"):
        LoraConfig(rank_pattern={"a" * 5000: 2})


# == 2. every tensor a file brings in is checked for NaN/inf ==============================================
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_modules_to_save_tensor_is_refused(tmp_path, value):
    path = _saved(tmp_path / "ad", tiny_bert(), modules_to_save=("classifier",))
    _edit(path, tensors=lambda t: t["base_model.model.classifier.weight"].view(-1).__setitem__(0, value))
    with pytest.raises(AdapterFileError, match=r"classifier\.weight holds NaN or infinite"):
        read_adapter(path)


def test_non_finite_bias_is_refused(tmp_path):
    path = _saved(tmp_path / "ad", tiny_bert(), targets=("v",), bias="all")
    key = next(k for k in load_file(path / "adapter_model.safetensors") if k.endswith("bias"))
    _edit(path, tensors=lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(AdapterFileError, match="holds NaN or infinite"):
        read_adapter(path)


def test_a_non_finite_adapter_is_never_written(tmp_path):
    model = tiny_llama()
    inject(model, LoraConfig(targets=("q",)))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    with pytest.raises(AdapterFileError, match="NaN or infinite"):
        save_adapter(model, tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


# == also: the file's two halves must agree ==============================================================
@pytest.mark.parametrize(
    "key, value", [("r", 4), ("lora_alpha", 64.0), ("use_rslora", True), ("rank_pattern", {"q_proj": 2})]
)
def test_peft_visible_settings_must_agree_with_the_lorakit_section(tmp_path, key, value):
    path = _saved(tmp_path / "ad")
    _edit(path, config=lambda raw: raw.__setitem__(key, value))
    with pytest.raises(AdapterFileError, match=f"{key}=.*disagrees with the lorakit section"):
        read_adapter(path)


def test_a_file_with_tensors_for_fewer_modules_than_listed_is_refused(tmp_path):
    path = _saved(tmp_path / "ad")

    def drop_layer_1_q(t):
        for k in [k for k in t if "layers.1.self_attn.q_proj" in k]:
            del t[k]

    _edit(path, tensors=drop_layer_1_q)
    with pytest.raises(AdapterFileError, match=r"no tensors for 1 of them: \['model\.layers\.1\.self_attn\.q_proj'\]"):
        read_adapter(path)


def test_a_file_missing_its_modules_to_save_tensors_is_refused(tmp_path):
    path = _saved(tmp_path / "ad", tiny_bert(), modules_to_save=("classifier",))
    _edit(path, tensors=lambda t: [t.pop(k) for k in list(t) if ".classifier." in k])
    with pytest.raises(AdapterFileError, match=r"no tensors for modules_to_save \['classifier'\]"):
        read_adapter(path)


# == also: file-system failures read as one line ===========================================================
def test_os_errors_are_described_in_one_line():
    import errno

    from lorakit.cli import describe_os_error

    assert describe_os_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run")) == (
        "Read-only file system: /mnt/ro/run"
    )
    assert describe_os_error(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b")).endswith("/a -> /b")
    assert describe_os_error(OSError("a library's\nmessage on\n two lines")) == "a library's message on two lines"
