"""Each concept has one registry: methods (lorakit.methods), tasks (lorakit.tasks), metrics (lorakit.metrics).
Entries added in a test are reachable from every entry point that takes a name."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.metrics import METRICS, register_metric
from lorakit.tasks import TASKS, Task, get_task, register_task
from lorakit.tasks.text import load_text_task
from lorakit.training.trainer import train
from train_util import base_cfg, write_sentiment_csv

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
# name → the one module that may define it
REGISTRIES = {
    "METHODS": "methods/registry.py",
    "TASKS": "tasks/__init__.py",
    "METRICS": "metrics/registry.py",
}


def _module_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        else:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_each_registry_is_defined_in_exactly_one_module():
    defined: dict[str, list[str]] = {name: [] for name in REGISTRIES}
    for path in SRC.rglob("*.py"):
        for name in _module_level_names(path) & set(REGISTRIES):
            defined[name].append(str(path.relative_to(SRC)))
    assert defined == {name: [where] for name, where in REGISTRIES.items()}
    # ... and no second table of trainer-only methods or task names is left anywhere.
    leftovers = {"TRAINER_METHODS", "NLG_TASKS", "TEXT_TASKS"}
    assert not [p for p in SRC.rglob("*.py") if _module_level_names(p) & leftovers]


def test_a_registered_task_and_metric_reach_the_trainer(tiny_bert, tmp_path, one_thread):
    data = write_sentiment_csv(tmp_path / "data", n_train=16, n_test=8)

    def scored_by_count(predictions, items, spec):
        return {"n_scored": float(len(predictions)), "first_label": float(items[0].label)}

    def load(cfg, roles):
        loaded = load_text_task(cfg, roles)
        loaded.spec = dataclasses.replace(loaded.spec, name="test-sentiment", metric="test-count")
        return loaded

    register_task(Task("test-sentiment", load, "text classification under another name"))
    register_metric("test-count", scored_by_count)
    try:
        assert get_task("TEST-sentiment").name == "test-sentiment"
        cfg = base_cfg(model=str(tiny_bert), task="test-sentiment", data=str(data), out=str(tmp_path / "run"),
                       max_steps=2, eval_interval=1)  # fmt: skip
        result = train(cfg)
        assert result["n_scored"] == 8.0 and result["first_label"] in (0.0, 1.0)
        with pytest.raises(ConfigError, match="already registered"):
            register_task(Task("test-sentiment", load))
    finally:
        TASKS.pop("test-sentiment")
        METRICS.pop("test-count")
    with pytest.raises(ConfigError, match=r"unknown task 'test-sentiment'; choose a GLUE task \(sst2.*'sft'"):
        get_task("test-sentiment")
