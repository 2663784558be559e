"""Validation during training is bounded (max_valid_samples) and shows a progress bar."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorakit.tasks import load_task
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import validate
from train_util import base_cfg


def _e2e_cfg(data, **kw) -> TrainConfig:
    return base_cfg(task="e2e", data=str(data), **kw)


def test_default_caps_validation_at_200_and_leaves_the_final_split_alone(tmp_path):
    lines = [f"name : R{i} | food : F{i % 7}||R{i} serves F{i % 7} food ." for i in range(3000)]
    (tmp_path / "valid.txt").write_text("\n".join(lines) + "\n")
    assert TrainConfig.__dataclass_fields__["max_valid_samples"].default == 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        capped = load_task(_e2e_cfg(tmp_path))
        full = load_task(_e2e_cfg(tmp_path, max_valid_samples=None))
    assert len(full.valid) == 300 and len(capped.valid) == 200  # 10% of 3000 MRs carved as valid
    assert {it.mr for it in capped.valid} <= {it.mr for it in full.valid}  # one reference each here
    assert len(capped.eval) == len(full.eval) == 300  # the final score is not capped by it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_task(_e2e_cfg(tmp_path, seed=5))
    assert again.valid == capped.valid  # a fixed subset: split_seed, not the training seed, picks it


def test_generation_tasks_count_reference_pairs(tmp_path):
    # 100 MRs x 10 references: the 10 carved valid MRs hold 100 pairs, of which 30 are kept.
    lines = [f"name : R{i}||R{i} reference {j} ." for i in range(100) for j in range(10)]
    (tmp_path / "valid.txt").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_task(_e2e_cfg(tmp_path, max_valid_samples=30))
        full = load_task(_e2e_cfg(tmp_path, max_valid_samples=None))
    assert len(data.valid) == 30 and all(len(it.references) == 1 for it in data.valid)
    pairs = {(it.mr, r) for it in full.valid for r in it.references}
    assert len(pairs) == 100 and {(it.mr, it.references[0]) for it in data.valid} <= pairs


def test_validation_shows_a_progress_bar(tiny_llama, tmp_path, capsys):
    from lorakit.data import E2EItem
    from lorakit.io.models import load_model
    from lorakit.tasks import TaskSpec

    model, tok = load_model(tiny_llama)
    items = [E2EItem(f"name : R{i}", [f"R{i} is nice ."]) for i in range(6)]
    cfg = _e2e_cfg(tmp_path, eval_batch_size=2)
    spec = TaskSpec("e2e", "generation", "causal-lm")
    quiet = validate(model, tok, spec, items, cfg, torch.device("cpu"))
    assert "valid" not in capsys.readouterr().err
    shown = validate(model, tok, spec, items, cfg, torch.device("cpu"), progress=True)
    err = capsys.readouterr().err
    assert "valid" in err and "/3 " in err  # three batches of two (tqdm may not redraw before it closes)
    assert shown == pytest.approx(quiet)
