"""`lorakit bench serve`'s reductions: medians over repeated cells and the issue's target checks."""

import json

from lorakit.bench.load import median_row
from lorakit.bench.serve_load import render_table, target_checks
from serve_util import sse_server


def _row(system: str, adapters: int, concurrency: int, tps: float, p99: float = 1.0, ttft: float = 0.1) -> dict:
    return {"system": system, "adapters": adapters, "concurrency": concurrency, "tokens_per_s": tps,
            "requests": 4, "tokens": 100, "p50_s": 0.5, "p99_s": p99, "ttft_p50_s": ttft, "mean_s": 0.5,
            "wall_s": 1.0, "cpu_ms_per_token": None}  # fmt: skip


def test_median_row_takes_the_middle_run_not_the_first_or_the_mean():
    runs = [_row("lorakit serve", 32, 32, tps, p99) for tps, p99 in ((150.0, 3.0), (90.0, 1.0), (100.0, 2.0))]
    row = median_row(runs)
    assert row["tokens_per_s"] == 100.0 and row["p99_s"] == 2.0
    assert row["tokens_per_s_runs"] == [150.0, 90.0, 100.0]
    assert row["requests"] == 12 and row["tokens"] == 300
    assert row["cpu_ms_per_token"] is None  # no figure in any run stays none, not 0


def test_target_checks_compare_many_adapters_at_top_concurrency_with_one_and_the_baselines():
    rows = [_row("lorakit serve", 1, 8, 500.0), _row("lorakit serve", 32, 8, 10.0),
            _row("lorakit serve", 1, 32, 120.0, ttft=0.8), _row("lorakit serve", 32, 32, 96.0),
            _row("(a) batching off", 32, 32, 12.0), _row("(c) prefill one at a time", 1, 32, 100.0, ttft=1.5),
            _row("(b) PEFT generate(adapter_names)", 32, 32, 100.0)]  # fmt: skip
    checks = {c["check"]: c for c in target_checks(rows)}
    many_vs_one = checks["32 adapters / 1 adapter at concurrency 32"]
    assert abs(many_vs_one["ratio"] - 0.8) < 1e-9 and not many_vs_one["met"]  # 0.80 < 0.9
    assert checks["32 adapters at concurrency 32 / (a) one at a time"]["met"]  # 8x >= 4x
    assert not checks["32 adapters at concurrency 32 / (b) PEFT batched"]["met"]  # 0.96x < 1
    ttft = checks["TTFT p50 at concurrency 32: (c) prefill alone / batched prefill"]
    assert abs(ttft["ratio"] - 1.5 / 0.8) < 1e-9 and not ttft["met"]  # 1.875x < 2x: not halved
    table = render_table({"results": rows, "targets": list(checks.values())})
    assert "| 32 adapters / 1 adapter at concurrency 32 | 0.80× | ≥ 0.90× | no |" in table


def test_one_request_counts_usage_tokens_and_times_the_first_text():
    """Against lorakit serve's stream shape for /v1/completions: text chunks, a usage chunk, then [DONE]."""
    from lorakit.bench.serve_load import one_request

    chunks = [{"choices": [{"text": ""}]}, {"choices": [{"text": "The"}]}, {"choices": [{"text": " Eagle"}]},
              {"choices": [], "usage": {"completion_tokens": 2}}]  # fmt: skip
    with sse_server([*(f"data: {json.dumps(c)}" for c in chunks), "data: [DONE]"]) as (port, _):
        latency, ttft, tokens = one_request(port, "a0", "Hi", 4)
    assert tokens == 2 and 0 < ttft <= latency


def test_plot_draws_bars_for_one_concurrency_and_lines_for_several(tmp_path):
    import matplotlib.image

    from lorakit.bench.serve_load import plot

    one_level = [_row("lorakit serve", 1, 32, 230.0, ttft=0.7), _row("llama.cpp, F32 base", 1, 32, 250.0, ttft=1.7),
                 _row("(b) PEFT generate(adapter_names)", 32, 32, 100.0, ttft=None)]  # fmt: skip
    levels = [_row("lorakit serve", 1, c, 10.0 * c) for c in (1, 8, 32)] + [_row("(a) batching off", 1, 32, 9.0)]
    for name, rows in (("bars", one_level), ("lines", levels)):
        out = tmp_path / f"{name}.png"
        plot({"results": rows, "meta": {"max_tokens": 64}}, out)
        assert matplotlib.image.imread(out).shape[1] > 1000  # a real image was written


def test_paired_rows_alternate_abba_and_the_check_takes_the_median_pair_ratio():
    from lorakit.bench.serve_load import PAIRED, paired_rows

    order, ours_tps, theirs_tps = [], iter([100.0, 90.0, 120.0, 80.0]), iter([100.0, 100.0, 100.0, 100.0])

    def ours():
        order.append("ours")
        return _row("lorakit serve", 1, 32, next(ours_tps))

    def theirs():
        order.append("theirs")
        return _row("llama.cpp, F32 base", 1, 32, next(theirs_tps))

    mine, other = paired_rows(ours, theirs, 4)
    assert order == ["ours", "theirs", "theirs", "ours", "ours", "theirs", "theirs", "ours"]
    assert (mine["system"], other["system"]) == PAIRED
    assert mine["pair_ratios"] == [1.0, 0.9, 1.2, 0.8] and mine["tokens_per_s"] == 95.0
    rows = [_row("lorakit serve", 1, 32, 100.0), _row("llama.cpp, F32 base", 1, 32, 80.0), mine, other]
    checks = {c["check"]: c for c in target_checks(rows)}
    assert checks["1 adapter at concurrency 32 / llama.cpp, F32 base"]["met"]  # 1.25x, unpaired
    paired = checks["1 adapter / llama.cpp, F32 base, median of 4 paired runs"]
    assert abs(paired["ratio"] - 0.95) < 1e-9 and not paired["met"]  # the paired figure can disagree: it is shown
