"""The training benches of scripts/: they import (bench_packing once could not, after a package move) and
their summaries count what they say."""

from __future__ import annotations

import pytest
import torch

from script_util import load_script


def test_bench_packing_counts_useful_and_trained_tokens_of_padded_and_padding_free_batches():
    bench = load_script("bench_packing")
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
              "labels": torch.tensor([[-100, -100, 7, 8, 9], [-100, 5, 6, -100, -100]])}  # fmt: skip
    flat = {"input_ids": torch.zeros(1, 6, dtype=torch.long),  # TRL's padding-free row: no mask, no padding
            "labels": torch.tensor([[-100, 3, 4, -100, -100, 5]])}  # fmt: skip
    assert bench._tokens([padded]) == (8, 5, 10)
    assert bench._tokens([padded, flat]) == (14, 8, 16)
    assert bench.SIDES == ("packed", "random", "random-order2", "trl-packed", "trl-padded")


def test_bench_base_dtype_summary_sets_bf16_against_fp32_per_seed_and_the_spread_of_orders():
    bench = load_script("bench_base_dtype")
    runs = [{"dtype": d, "seed": s, "peak_rss_mib": rss, "step_s": t, "valid_loss": loss}
            for d, s, rss, t, loss in [("fp32", 0, 2000, 2.0, 1.90), ("bf16", 0, 1600, 1.2, 1.91),
                                       ("fp32", 1, 2100, 2.2, 1.95), ("bf16", 1, 1700, 1.4, 1.94)]]  # fmt: skip
    out = bench.summary(runs)
    assert out["step_ratio"] == pytest.approx(1.3 / 2.1)
    assert out["rss_ratio"] == pytest.approx(1650 / 2050)
    assert out["bf16_minus_fp32_loss_per_seed"] == pytest.approx({0: 0.01, 1: -0.01})
    assert out["fp32_loss_spread_over_seeds"] == pytest.approx(0.05)
