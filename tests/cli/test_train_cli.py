"""`lorakit train` → files → `lorakit eval` end to end with the real minilm-l6 on a slice of RTE."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.cli.evaluate import eval_main
from lorakit.cli.train import train_main


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory, shared_data, minilm_path):
    """One short real run shared by the tests below: 32 RTE examples, 4 steps, LoRA q,v r=8 on minilm-l6."""
    out = tmp_path_factory.mktemp("cli") / "rte"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [
            "--model", "minilm-l6", "--task", "rte", "--data", str(shared_data / "glue" / "RTE"),
            "--method", "lora", "--r", "8", "--alpha", "16", "--targets", "q,v", "--max-steps", "4",
            "--batch-size", "8", "--max-train-samples", "32", "--max-eval-samples", "24",
            "--max-length", "64",
            "--seed", "1", "--out", str(out),
        ]  # fmt: skip
        assert train_main(argv) == 0
    finally:
        torch.set_num_threads(before)
    return out


def test_train_writes_the_documented_layout(rte_run):
    out = rte_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.json", "metrics.jsonl",
                 "eval_results.json", "training.png"):  # fmt: skip
        assert (out / name).is_file(), name
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["task"], saved["r"], saved["alpha"], saved["targets"], saved["seed"]) == (
        "rte",
        8,
        16.0,
        ["q", "v"],
        1,
    )
    adapter = json.loads((out / "adapter_config.json").read_text())
    # RTE's recipe (lorakit.tasks.glue.RECIPES): the classifier alone, A kaiming-uniform; both resolved and saved.
    assert adapter["modules_to_save"] == ["classifier"] and adapter["task_type"] == "SEQ_CLS"
    assert (saved["init"], saved["train_pooler"], saved["head_lr_ratio"]) == ("kaiming", False, 1.0)
    weights = load_file(out / "adapter_model.safetensors")
    assert sum(".lora_A." in k for k in weights) == 12  # q and v in 6 layers
    assert any(weights[k].abs().max() > 0 for k in weights if ".lora_B." in k)  # trained away from B = 0
    result = json.loads((out / "eval_results.json").read_text())
    assert set(result) == {"accuracy"} and 0.0 <= result["accuracy"] <= 1.0


def test_eval_json_reproduces_the_training_score(rte_run, shared_data, capfd, one_thread):
    capfd.readouterr()
    argv = ["--model", "minilm-l6", "--adapter", str(rte_run), "--task", "rte", "--data",
            str(shared_data / "glue" / "RTE"), "--json"]  # fmt: skip
    assert eval_main(argv) == 0
    captured = capfd.readouterr()
    assert captured.out.count("\n") == 1  # one JSON object on stdout; progress went to stderr
    assert json.loads(captured.out) == pytest.approx(json.loads((rte_run / "eval_results.json").read_text()))
    # The table form, with settings read from the run (task, data, subset) when only --adapter is given.
    assert eval_main(["--adapter", str(rte_run)]) == 0
    table = capfd.readouterr().out
    assert "accuracy" in table and "rte" in table


def test_eval_of_a_merged_model_folder_matches_the_adapter(rte_run, shared_data, tmp_path, capfd, one_thread):
    from lorakit import merge_and_unload
    from lorakit.io.models import load_model
    from lorakit.training.outputs import load_trained

    model, tok = load_model("minilm-l6", "seq-cls", num_labels=2)
    load_trained(model, rte_run)
    merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    capfd.readouterr()
    data = str(shared_data / "glue" / "RTE")
    argv = ["--model", str(tmp_path / "merged"), "--task", "rte", "--data", data, "--max-eval-samples", "24",
            "--json"]  # fmt: skip
    assert eval_main(argv) == 0
    merged = json.loads(capfd.readouterr().out)
    assert merged == pytest.approx(json.loads((rte_run / "eval_results.json").read_text()))


def test_command_line_errors_are_clear_and_early(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('task = "rte"\ndata = "x"\nlearning_rate = 0.1\n')
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "unknown key(s) 'learning_rate'" in err and "known keys" in err
    assert (
        main(["train", "--task", "rte", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--lerning-rate", "0.1"])
    assert "unrecognized arguments: --lerning-rate" in capsys.readouterr().err


def test_every_config_field_is_a_flag(capsys):
    from lorakit.training.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.field_names():
        assert "--" + name.replace("_", "-") in text, name
    assert "--resume" in text and "--config" in text
