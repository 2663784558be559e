"""The sampler: data order by seed and epoch, global batches split into micro-batches per rank, and
length-grouped batches (deterministic, every example once per epoch, less padding, logged padding share;
a run killed mid-epoch then resumed equals an uninterrupted one)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.training import checkpoint as ckpt
from lorakit.training.sampler import epoch_batches, epoch_order, global_batches, local_micro_batches, padded_share
from lorakit.training.trainer import train
from tiny import make_tiny_bert
from train_util import base_cfg, cli_args, run_config, train_records

REPO = Path(__file__).resolve().parents[2]


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [0] * rng.choice([3, 5, 40, 90, rng.randint(2, 120)])} for _ in range(n)]


def test_grouped_batches_are_deterministic_complete_and_pad_less():
    rows = _rows(1000)
    cfg = base_cfg(task="text", data="d", batch_size=16, length_grouping=True)
    plain = base_cfg(task="text", data="d", batch_size=16)
    batches = epoch_batches(rows, cfg, epoch=0, world_size=1)
    assert batches == epoch_batches(rows, cfg, epoch=0, world_size=1)  # a function of (seed, epoch)
    assert batches != epoch_batches(rows, cfg, epoch=1, world_size=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))  # each example once
    random_batches = epoch_batches(rows, plain, epoch=0, world_size=1)
    assert random_batches == global_batches(epoch_order(1000, 0, 0), 16, 1)  # off: the trainer's old order
    assert [len(b) for b in sorted(batches, key=len)] == [len(b) for b in sorted(random_batches, key=len)]
    grouped, shuffled = padded_share(rows, batches), padded_share(rows, random_batches)
    assert grouped < 0.25 * shuffled and shuffled > 0.3
    # Batches are shuffled as a whole: not sorted by length across the epoch.
    longest = [max(len(rows[i]["input_ids"]) for i in b) for b in batches]
    assert longest != sorted(longest, reverse=True)


def test_group_window_trades_padding_for_randomness_and_one_batch_windows_keep_random_membership():
    rows = _rows(1000)
    shares = {}
    for window in (1, 4, 50):
        cfg = base_cfg(task="text", data="d", batch_size=16, length_grouping=True, group_window=window)
        shares[window] = padded_share(rows, epoch_batches(rows, cfg, epoch=0, world_size=1))
    random_batches = epoch_batches(rows, base_cfg(task="text", data="d", batch_size=16), epoch=0, world_size=1)
    assert shares[1] == pytest.approx(padded_share(rows, random_batches))
    assert shares[1] > shares[4] > shares[50]
    # A one-batch window sorts inside each random batch only: the same batches, in another order.
    one = base_cfg(task="text", data="d", batch_size=16, length_grouping=True, group_window=1)
    as_sets = sorted(sorted(b) for b in epoch_batches(rows, one, epoch=0, world_size=1))
    assert as_sets == sorted(sorted(b) for b in random_batches)
    with pytest.raises(ConfigError, match="group_window must be >= 1"):
        base_cfg(task="text", data="d", length_grouping=True, group_window=0)


def _write_varied_csv(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for name, n in (("train", 40), ("test", 8)):
        lines = ["text,label"]
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            filler = " ".join(rng.choice(["the", "a", "film", "plot", "scene"]) for _ in range(rng.randint(1, 25)))
            lines.append(f"{filler} {'great' if label == 'pos' else 'awful'} {i},{label}")
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_sigkill_then_resume_with_length_grouping_matches_an_uninterrupted_run(tmp_path, one_thread):
    model = make_tiny_bert(tmp_path / "tiny-bert-dropout", dropout=0.1)
    data = _write_varied_csv(tmp_path / "data")
    reference_cfg = run_config(model, data, tmp_path / "reference")
    reference_cfg.length_grouping = True
    reference = train(reference_cfg)
    records = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["pad_share"] for r in records if r["split"] == "train"]
    assert shares and all(0.0 <= s < 1.0 for s in shares)

    killed = run_config(model, data, tmp_path / "killed")
    killed.length_grouping = True
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *cli_args(killed), "--length-grouping",
         "--debug-kill-after-step", "7"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,  # slow only on a saturated machine
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "killed")] == [3, 6]

    resumed = train(killed, resume=True)

    assert resumed == pytest.approx(reference, abs=1e-6)
    def rounded(out: Path) -> list[dict]:
        return [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in train_records(out)]

    assert rounded(tmp_path / "killed") == rounded(tmp_path / "reference")  # same losses, step by step
    a = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key


def test_data_order_depends_only_on_seed_and_epoch():
    assert epoch_order(20, 3, 1) == epoch_order(20, 3, 1)
    assert epoch_order(20, 3, 1) != epoch_order(20, 3, 2)
    assert sorted(epoch_order(20, 3, 1)) == list(range(20))


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_micro_batches_partition_each_global_batch(world, accum):
    for batch in global_batches(list(range(23)), 8, world):
        parts = [local_micro_batches(batch, r, world, accum) for r in range(world)]
        assert sorted(i for rank in parts for mb in rank for i in mb) == sorted(batch)
        assert len({len(rank) for rank in parts}) == 1  # same number of micro-steps on every rank
        assert all(mb for rank in parts for mb in rank)
    assert global_batches(list(range(9)), 8, 2) == [list(range(8))]  # a 1-example tail cannot feed 2 ranks
