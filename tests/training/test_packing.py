"""Sample packing (``--packing``): best-fit-decreasing rows, per-record logits and loss equal to the unpacked
records' on real SmolLM2 (fp32), no attention across records, the same loss targets, deterministic epochs,
and a packed run killed mid-epoch then resumed equals an uninterrupted one."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import train_records

from lorakit.data import DataError
from lorakit.data.packing import best_fit_decreasing, collate_packed, pack_rows
from lorakit.data.sft import SftRecord
from lorakit.errors import ConfigError
from lorakit.tasks import TaskSpec
from lorakit.training.evaluate import collate, encode, loss_sum
from lorakit.training.sampler import epoch_order, epoch_plan, steps_per_epoch
from train_util import base_cfg

REPO = Path(__file__).resolve().parents[1]
SPEC = TaskSpec("sft", "generation", "causal-lm")
CHATS = [
    ("Name a colour.", "Blue."),
    ("Describe: name[The Eagle], eatType[coffee shop], food[French], area[riverside]",
     "The Eagle is a French coffee shop by the riverside, near Burger King, with a low price range."),
    ("Say yes.", "Yes"),
    ("What is two plus two? Answer with a word.", "Four, which is two added to two."),
]  # fmt: skip


def _records(tok) -> list[dict]:
    records = [SftRecord(f"r{i}", messages=(("user", p), ("assistant", a))) for i, (p, a) in enumerate(CHATS)]
    return encode(SPEC, records, tok, 256, "left")


def _bins_ok(bins: list[list[int]], lengths: list[int], capacity: int) -> None:
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every record once, none split
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_best_fit_decreasing_fills_rows_deterministically_and_refuses_an_oversized_record():
    rng = random.Random(0)
    lengths = [rng.choice([3, 9, 40, rng.randint(2, 128)]) for _ in range(500)]
    bins = best_fit_decreasing(lengths, epoch_order(500, 0, 0), 128)
    _bins_ok(bins, lengths, 128)
    assert len(bins) <= sum(lengths) / 128 * 1.05 + 1  # nearly full rows
    assert bins == best_fit_decreasing(lengths, epoch_order(500, 0, 0), 128)
    other = best_fit_decreasing(lengths, epoch_order(500, 0, 1), 128)
    assert other != bins and len(other) == len(bins)  # other partners, same number of rows
    with pytest.raises(DataError, match="record 1 has 9 tokens, more than a packed row of 8"):
        best_fit_decreasing([3, 9], [0, 1], 8)


def test_epoch_plan_packs_every_record_once_per_epoch_with_stable_step_counts():
    rng = random.Random(1)
    rows = [{"input_ids": [5] * (n := rng.randint(2, 60)), "labels": [-100] * 2 + [5] * (n - 2)}
            for _ in range(300)]  # fmt: skip
    cfg = base_cfg(task="sft", data="-", packing=True, max_length=64, batch_size=4)
    per_epoch = steps_per_epoch(rows, cfg, world_size=1)
    for epoch in range(3):
        packed, batches = epoch_plan(rows, cfg, epoch, world_size=1)
        assert len(batches) == per_epoch and all(len(b) == 4 for b in batches[:-1])
        assert sum(len(r["records"]) for r in packed) == 300
        assert sum(r["n_targets"] for r in packed) == sum(len(r["labels"]) - 2 for r in rows)
        assert epoch_plan(rows, cfg, epoch, world_size=1)[1] == batches
    assert epoch_plan(rows, cfg, 0, 1)[0] != epoch_plan(rows, cfg, 1, 1)[0]
    unpacked = base_cfg(task="sft", data="-", max_length=64, batch_size=4)
    assert epoch_plan(rows, unpacked, 0, 1)[0] is rows and per_epoch < steps_per_epoch(rows, unpacked, 1)


def _logits(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:
        inputs.pop("attention_mask")  # as loss_sum calls the model on packed rows
        inputs["use_cache"] = False
    with torch.no_grad():
        return model(**inputs).logits


def test_packed_rows_give_each_record_its_unpacked_logits_loss_and_targets(smollm2):
    model, tok = smollm2
    rows = _records(tok)
    packed = pack_rows(rows, [[0, 1], [2, 3]])  # two rows of different lengths: the shorter one is padded
    batch = collate_packed(packed, tok.pad_token_id)
    assert int(batch["attention_mask"].sum()) == sum(len(r["input_ids"]) for r in rows)
    logits = _logits(model, batch)
    for k, members in enumerate([[0, 1], [2, 3]]):
        start = 0
        for i in members:
            alone = _logits(model, collate(SPEC, [rows[i]], tok.pad_token_id))[0]
            n = len(rows[i]["input_ids"])
            # fp32 matmuls of another shape round differently: equal to 1e-5 of the logits' scale.
            assert (logits[k, start : start + n] - alone).abs().max() < 1e-5 * alone.abs().max()
            start += n
    packed_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert packed_targets == sum(r["n_targets"] for r in packed) == sum(r["n_targets"] for r in rows)
    with torch.no_grad():
        packed_loss = loss_sum(SPEC, model, batch)
        unpacked_loss = sum(loss_sum(SPEC, model, collate(SPEC, [r], tok.pad_token_id)) for r in rows)
    assert float(packed_loss) == pytest.approx(float(unpacked_loss), rel=1e-5)


def test_perturbing_one_record_changes_no_other_record_in_the_row(smollm2):
    model, tok = smollm2
    rows = _records(tok)
    lengths = [len(r["input_ids"]) for r in rows]
    before = _logits(model, collate_packed(pack_rows(rows, [[0, 1, 2, 3]]), tok.pad_token_id))[0]
    changed = [dict(r) for r in rows]
    changed[1] = {**rows[1], "input_ids": [(t + 17) % len(tok) for t in rows[1]["input_ids"]]}
    after = _logits(model, collate_packed(pack_rows(changed, [[0, 1, 2, 3]]), tok.pad_token_id))[0]
    spans = torch.tensor([0, *lengths]).cumsum(0).tolist()
    diffs = [float((after[a:b] - before[a:b]).abs().max()) for a, b in itertools.pairwise(spans)]
    assert diffs[1] > 1.0  # the perturbed record itself moves
    assert diffs[0] == 0.0  # before the perturbation: causal
    # After it, records 2 and 3 are kept apart only by the block-diagonal mask: unchanged to rounding.
    assert max(diffs[2:]) < 1e-5 * float(before.abs().max())


def test_packing_refuses_tasks_and_methods_it_cannot_keep_apart():
    from lorakit.training.prepare import check_packing

    with pytest.raises(ConfigError, match="--packing is for causal-LM tasks"):
        check_packing(base_cfg(task="rte", data="-", packing=True), TaskSpec("rte", "classification", "seq-cls"))
    with pytest.raises(ConfigError, match="method 'prefix_embed'"):
        check_packing(base_cfg(task="sft", data="-", packing=True, method="prefix_embed"), SPEC)
    with pytest.raises(ConfigError, match="--packing and --length-grouping"):
        check_packing(base_cfg(task="sft", data="-", packing=True, length_grouping=True), SPEC)
    check_packing(base_cfg(task="e2e", data="-", packing=True), SPEC)


def _e2e_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--task", "e2e", "--data", str(data), "--out", str(out), "--packing",
            "--max-train-samples", "96", "--max-eval-samples", "2", "--max-valid-samples", "8",
            "--max-length", "96", "--batch-size", "2", "--max-steps", "9", "--save-interval", "3",
            "--eval-interval", "4", "--dropout", "0.1", "--lr", "2e-3", "--log-interval", "1",
            "--keep-checkpoints", "0", "--num-beams", "1", "--max-new-tokens", "4", "--no-plot"]  # fmt: skip


def test_sigkill_then_resume_with_packing_matches_an_uninterrupted_run(tiny_llama, tmp_path, shared_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "lorakit", "train", *_e2e_args(tiny_llama, shared_data / "e2e", out), *extra]
        return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = run(tmp_path / "killed", "--debug-kill-after-step", "7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def rounded(out: Path) -> list[dict]:
        return [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in train_records(out)]

    assert rounded(tmp_path / "killed") == rounded(tmp_path / "reference")  # same batches, same losses
    lines = [json.loads(x) for x in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pad_share"] < 0.5 for r in lines if r["split"] == "train")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_each_family_keeps_packed_records_apart_in_the_trainer_loss(family):
    import tiny

    model = getattr(tiny, f"tiny_{family}")()
    rng = random.Random(3)
    rows = [{"input_ids": (ids := [rng.randrange(2, 64) for _ in range(n)]), "labels": [-100, -100, *ids[2:]]}
            for n in (7, 5, 9)]  # fmt: skip
    batch = collate_packed(pack_rows(rows, [[0, 1, 2]]), pad_token_id=1)
    changed = collate_packed(pack_rows([rows[0], {**rows[1], "input_ids": [3] * 5}, rows[2]], [[0, 1, 2]]), 1)
    with torch.no_grad():
        row = loss_sum(SPEC, model, batch)
        alone = sum(loss_sum(SPEC, model, collate(SPEC, [{**r, "attention_mask": [1] * len(r["input_ids"])}], 1))
                    for r in rows)  # fmt: skip
        last = [_logits(model, b)[0, 12:] for b in (batch, changed)]
    assert float(row) == pytest.approx(float(alone), rel=1e-5)
    assert float((last[0] - last[1]).abs().max()) < 1e-6  # record 3 does not see record 2
