"""`lorakit compare` with a fake training runner: resume/skip, failures, the table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli.compare import compare_main
from lorakit.errors import ConfigError
from lorakit.experiments import compare
from lorakit.experiments.compare import parse_spec, run_compare, trainable_count, write_outputs

BASE = {"task": "rte", "data": "/nowhere/RTE"}
SIZES = {"lora": 1000, "bitfit": 300, "adapter_h": 5000}


class FakeRunner:
    """Writes what a finished training run leaves behind; accuracy = 0.6 + 0.1·seed (+0.05 for lora)."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.calls: list[tuple[str, int, bool]] = []
        self.configs: list[dict] = []
        self.fail = fail

    def __call__(self, config: dict, *, resume: bool, overwrite: bool) -> dict[str, float]:
        self.calls.append((config["method"], config["seed"], resume))
        self.configs.append(config)
        if config["method"] in self.fail:
            raise ConfigError(f"{config['method']} cannot run here")
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(config))
        n = SIZES[config["method"]]
        (out / "trainable_state.json").write_text(json.dumps({"parameters": {"w": [n // 10, 10]}}))
        metrics = {"accuracy": 0.6 + 0.1 * config["seed"] + (0.05 if config["method"] == "lora" else 0.0),
                   "f1": 0.5}
        (out / "eval_results.json").write_text(json.dumps(metrics))
        return metrics


def specs(*texts: str):
    fields = compare.train_fields()
    return [parse_spec(t, fields) for t in texts]


def test_runs_then_skips_then_resumes(tmp_path, monkeypatch):
    runner = FakeRunner()
    monkeypatch.setattr(compare, "run_training", runner)
    records = run_compare(specs("lora", "bitfit"), [0, 1, 2], BASE, tmp_path)
    assert [(m, s) for m, s, _ in runner.calls] == [("lora", 0), ("lora", 1), ("lora", 2),
                                                   ("bitfit", 0), ("bitfit", 1), ("bitfit", 2)]
    assert {r["status"] for r in records} == {"trained"}
    assert records[0]["trainable"] == 1000 and records[3]["trainable"] == 300
    assert (tmp_path / "lora" / "seed-1" / "eval_results.json").is_file()
    # Same command again: everything is done, nothing runs.
    runner.calls.clear()
    records = run_compare(specs("lora", "bitfit"), [0, 1, 2], BASE, tmp_path)
    assert runner.calls == [] and {r["status"] for r in records} == {"skipped"}
    assert records[1]["metrics"]["accuracy"] == pytest.approx(0.75)
    # A run that died half way (config written, no results) resumes; a missing one starts fresh.
    (tmp_path / "bitfit" / "seed-2" / "eval_results.json").unlink()
    records = run_compare(specs("lora", "bitfit"), [0, 1, 2, 3], BASE, tmp_path)
    assert runner.calls == [("lora", 3, False), ("bitfit", 2, True), ("bitfit", 3, False)]
    statuses = [r["status"] for r in records if r["method"] == "bitfit"]
    assert statuses == ["skipped", "skipped", "resumed", "trained"]
    assert json.loads((tmp_path / "compare.json").read_text()) == records
    # --overwrite retrains everything from scratch.
    runner.calls.clear()
    run_compare(specs("lora"), [0], BASE, tmp_path, overwrite=True)
    assert runner.calls == [("lora", 0, False)]


def test_finished_run_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_training", FakeRunner())
    run_compare(specs("lora"), [0], {**BASE, "lr": "1e-3"}, tmp_path)
    with pytest.raises(ConfigError, match=r"a finished run with other settings \(lr\).*--overwrite"):
        run_compare(specs("lora"), [0], {**BASE, "lr": "2e-3"}, tmp_path)
    same = {**BASE, "lr": 0.001, "eval_batch_size": 8}  # the same lr; batch size for eval changes nothing
    assert run_compare(specs("lora"), [0], same, tmp_path)[0]["status"] == "skipped"


def test_table_plot_and_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_training", FakeRunner(fail=("bitfit",)))
    records = run_compare(specs("lora", "bitfit", "lora:r=4"), [0, 1, 2], BASE, tmp_path)
    assert [r["status"] for r in records].count("failed") == 3  # bitfit failed, the rest still ran
    assert (tmp_path / "lora__r=4" / "seed-0").is_dir()
    table = write_outputs(records, tmp_path, title="minilm · rte")
    lines = table.splitlines()
    assert lines[0] == "| method | trainable params | seeds | accuracy | f1 |"
    assert lines[2] == "| lora | 1.0K | 3 | 0.7500 ± 0.1000 | 0.5000 ± 0.0000 |"  # median ± sample std
    assert lines[3] == "| bitfit | ? | 0 (3 failed) | – | – |"
    assert "- bitfit, seed 0: bitfit cannot run here" in table
    assert (tmp_path / "compare.md").read_text().startswith("# minilm · rte\n\n| method |")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    half = write_outputs(records, tmp_path, spread="halfrange", metrics=["accuracy"])
    assert "| lora | 1.0K | 3 | 0.7500 ± 0.1000 |" in half and "half the range" in half
    with pytest.raises(ConfigError, match="plot metric 'bleu'"):
        write_outputs(records, tmp_path, plot_metric="bleu")


def test_specs_and_errors(tmp_path, monkeypatch):
    spec = parse_spec("adapter_h:bottleneck=64:lr=1e-3", compare.train_fields())
    assert (spec.method, spec.settings, spec.options) == ("adapter_h", {"lr": "1e-3"}, {"bottleneck": "64"})
    assert spec.dirname == "adapter_h__bottleneck=64__lr=1e-3"
    with pytest.raises(ConfigError, match="key=value"):
        parse_spec("lora:r", [])
    with pytest.raises(ConfigError, match="seed is set by compare"):
        parse_spec("lora:seed=3", ["seed"])
    runner = FakeRunner()
    monkeypatch.setattr(compare, "run_training", runner)
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['adaptr'\]; known: .*adapter_h.*lora"):
        run_compare(specs("lora", "adaptr"), [0], BASE, tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        run_compare(specs("lora"), [0], {**BASE, "bad_field": 1}, tmp_path)
    assert runner.calls == []  # nothing ran: every config is checked first
    if "method_options" not in compare.train_fields():
        with pytest.raises(ConfigError, match="this training pipeline has no method_options"):
            run_compare(specs("adapter_h:bottleneck=8"), [0], BASE, tmp_path)
    # With a pipeline that takes method_options, they are passed as key=value strings.
    fields = [*compare.CONTROLLED, "task", "data", "method_options"]
    monkeypatch.setattr(compare, "train_fields", lambda: fields)
    monkeypatch.setattr(compare, "_normalised", dict)
    run_compare(specs("adapter_h:bottleneck=8"), [0], BASE, tmp_path)
    assert runner.configs[-1]["method_options"] == ["bottleneck=8"]


def test_trainable_count_reads_lora_adapters(tmp_path):
    save_file({"a": torch.zeros(4, 8), "b": torch.zeros(16, 4)}, tmp_path / "adapter_model.safetensors")
    assert trainable_count(tmp_path) == 4 * 8 + 16 * 4
    assert trainable_count(tmp_path / "nothing") is None


def test_cli_passes_training_flags_through(tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(compare, "run_training", runner)
    argv = ["--methods", "lora,bitfit", "--method", "adapter_h", "--seeds", "0,1", "--task", "rte", "--data",
            "/nowhere", "--lr", "1e-3", "--max-steps", "5", "--out", str(tmp_path)]
    assert compare_main(argv) == 0
    assert len(runner.calls) == 6
    config = runner.configs[0]
    assert (config["lr"], config["max_steps"], config["task"], config["seed"]) == (0.001, 5, "rte", 0)
    assert config["out"] == str(tmp_path / "lora" / "seed-0")
    out = capsys.readouterr().out
    assert "| adapter_h | 5.0K | 2 |" in out and (tmp_path / "compare.png").is_file()
    with pytest.raises(SystemExit):
        compare_main(["--task", "rte", "--data", "x"])  # no methods named
