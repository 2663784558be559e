"""The useful-tokens bench case on a tiny random GPT-2: four sides from one start, padding, report."""

from __future__ import annotations

import math

import pytest

from lorakit.bench.measure import Measure
from lorakit.bench.report import render_markdown
from lorakit.bench.suites import Case
from lorakit.bench.tokens import run_tokens, tokens_cases
from lorakit.bench.verdicts import compute_ratios


@pytest.mark.slow  # ~45 s on 2 shared cores: 4 sides x 4 steps of a 50k-vocabulary model
def test_tokens_case_compares_grouped_random_and_peft(one_thread):
    case = Case(id="tokens/tiny/e2e", kind="tokens", model="gpt2-L1-D32", batch=8, loss="labels",
                group="tokens", warmup=1, repeats=3, targets=("o",))  # fmt: skip  (PEFT cannot slice c_attn)
    result = run_tokens(case, Measure("cpu"))
    sides = result["sides"]
    assert set(sides) == {"lorakit-grouped", "lorakit-random", "peft-random", "lorakit-random-order2"}
    # The other shuffle is other batches: its loss differs, and both relative differences are reported.
    loss = {s: v["held_out_loss"] for s, v in sides.items()}
    assert loss["lorakit-random-order2"] != loss["lorakit-random"]
    assert math.isclose(result["order_loss_rel_diff"], loss["lorakit-random-order2"] / loss["lorakit-random"] - 1)
    assert math.isclose(result["grouped_loss_rel_diff"], loss["lorakit-grouped"] / loss["lorakit-random"] - 1)
    # Random sides see the same batches; grouping pads far less on the same rows.
    assert sides["lorakit-random"]["pad_share"] == sides["peft-random"]["pad_share"] > 0.2
    assert sides["lorakit-grouped"]["pad_share"] < 0.5 * sides["lorakit-random"]["pad_share"]
    assert all(v["useful_tok_s"] > 0 and math.isfinite(v["held_out_loss"]) for v in sides.values())
    # Same start and same batches: lorakit's default loss path and PEFT's plain loop learn alike.
    assert abs(sides["lorakit-random"]["held_out_loss"] / sides["peft-random"]["held_out_loss"] - 1) < 1e-3
    expected = sides["lorakit-grouped"]["useful_tok_s"] / sides["peft-random"]["useful_tok_s"]
    assert math.isclose(result["grouped_over_peft"], expected)
    record = {"id": case.id, "case": {**case.__dict__, "targets": list(case.targets)}, **result}
    summary = compute_ratios([record])
    assert [t["target"] for t in summary["targets"]] == [
        "useful tokens/s, lorakit length-grouped / PEFT random batches, gpt2-L1-D32 e2e",
        "useful tokens/s at equal held-out loss, lorakit random / PEFT random batches, gpt2-L1-D32 e2e",
        "held-out loss, length-grouped / random batches - 1, gpt2-L1-D32 e2e",
    ]
    assert math.isclose(result["random_over_peft"],
                        sides["lorakit-random"]["useful_tok_s"] / sides["peft-random"]["useful_tok_s"])
    equal_loss = summary["targets"][2]
    assert equal_loss["met"] == (result["grouped_loss_rel_diff"] <= abs(result["order_loss_rel_diff"]))
    report = {"meta": {"command": "t", "date": "d", "loadavg_start": [0, 0, 0], "loadavg_end": [0, 0, 0],
                       "machine": {"cpu": "c", "cores": 2, "cpu_capability": "x", "device": "cpu", "torch": "t",
                                   "transformers": "t", "peft": "p"}},
              "results": [record], "summary": summary}  # fmt: skip
    assert "| gpt2-L1-D32 | e2e | lorakit-grouped |" in render_markdown(report)
    assert [c.data for c in tokens_cases()] == ["e2e", "sft"]
