"""TrainConfig from files and flags: precedence, typos named with the known keys, value checks."""

from __future__ import annotations

import pytest

from lorakit import ConfigError
from lorakit.training.config import TrainConfig, read_config_file, resolve_config

# -- config ----------------------------------------------------------------------------------------------


def test_config_file_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('task = "rte"\ndata = "somewhere"\nr = 4\nlr = 1e-3\ntargets = ["q", "k"]\nbf16 = true\n')
    cfg = resolve_config(path, {"r": "16", "targets": "q,v,o"})
    assert (cfg.task, cfg.r, cfg.lr, cfg.bf16) == ("rte", 16, 1e-3, True)
    assert cfg.targets == ["q", "v", "o"]
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("train:\n  task: e2e\n  data: d\n  max_steps: 7\n  warmup_steps: 2\n")
    cfg = resolve_config(yaml_path, {})
    assert (cfg.task, cfg.max_steps, cfg.warmup_steps) == ("e2e", 7, 2)


def test_config_typo_names_the_key_and_the_known_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('task = "rte"\ndata = "d"\nlearning_rate = 1e-3\n')
    with pytest.raises(ConfigError) as err:
        resolve_config(path, {})
    message = str(err.value)
    assert (
        "'learning_rate' (did you mean 'lr'?)" in message
        and "known keys" in message
        and "weight_decay" in message
    )
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict({"task": "rte", "data": "d", "batch-sise": 8})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"r": "four"}, "r = 'four' is not a valid int"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"batch_size": "0"}, "batch_size must be >= 1"),
        ({"epochs": "0"}, "epochs must be positive"),
        ({"task": ""}, "task is required"),
        ({"compile": True, "fsdp": True}, "compile and fsdp cannot be combined"),
        ({"model_dropout": "1.0"}, r"model_dropout must be in \[0, 1\) or none"),
    ],
)
def test_config_values_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, {"task": "rte", "data": "d", **override})


def test_unparseable_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("task = \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        read_config_file(path)
