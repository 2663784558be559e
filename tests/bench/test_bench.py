"""The benchmark's machinery on a tiny model: one case in its own subprocess, then the report."""

from __future__ import annotations

import os

from lorakit.bench.report import render_markdown
from lorakit.bench.suites import Case, default_cases, run_in_subprocess, select
from lorakit.bench.verdicts import compute_ratios
from lorakit.cli.bench import bench_main


def test_a_paired_case_runs_in_a_subprocess_and_reports_time_memory_and_load():
    case = Case(
        id="pair/tiny/like-for-like-fp32", kind="pair", model="gpt2-L1-D32", batch=2, seq=8, warmup=0,
        repeats=2, group="pair", threads=1, other={"method": "peft", "precision": "fp32", "loss": "model"},
    )
    result = run_in_subprocess(case, timeout=120)
    assert "error" not in result, result.get("error")
    assert result["ratio"] > 0 and len(result["times"]["mine"]) == 2 == len(result["times"]["other"])
    assert result["peak_rss_mb"] >= result["rss_loaded_mb"] > 0
    assert len(result["loadavg_before"]) == 3 and result["threads"] == 1
    report = {
        "meta": {"command": "test", "date": "today", "loadavg_start": list(os.getloadavg()),
                 "loadavg_end": list(os.getloadavg()),
                 "machine": {"cpu": "cpu", "cores": 2, "cpu_capability": "x", "device": "cpu", "torch": "t",
                             "transformers": "t", "peft": "p"}},
        "results": [result, {"id": "broken", "case": {}, "error": "exit 1: boom"}],
    }
    report["summary"] = compute_ratios(report["results"])
    assert [t["target"] for t in report["summary"]["targets"]] == [
        "same-precision step time (fp32, lorakit model loss / PEFT model loss), gpt2-L1-D32"
    ]
    text = render_markdown(report)
    assert "| gpt2-L1-D32 | like-for-like-fp32 |" in text and "`broken`: exit 1: boom" in text


def test_case_selection_by_section_or_id(capsys):
    cases = default_cases()
    assert len({c.id for c in cases}) == len(cases)
    assert {c.group for c in select(cases, ["mixed"])} == {"mixed"}
    assert [c.id for c in select(cases, ["switch/smollm2-135m/peft"])] == ["switch/smollm2-135m/peft"]
    assert bench_main(["--list", "--cases", "merge"]) == 0
    assert capsys.readouterr().out.split() == ["merge/smollm2-135m/lorakit", "merge/smollm2-135m/peft"]
    assert Case.from_json(cases[0].to_json()) == cases[0]
