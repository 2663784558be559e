"""One bench session: pick the cases, run each in its own subprocess, record the machine and its load, and
write ``bench.json``, ``bench.md`` and the scaling plot. ``lorakit bench`` (``lorakit.cli.bench``) drives it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from lorakit.bench.plot import plot_scaling
from lorakit.bench.report import render_markdown
from lorakit.bench.suites import (
    Case,
    default_cases,
    quality_cases,
    quick_cases,
    run_in_subprocess,
    scaling_cases,
    select,
)
from lorakit.bench.tokens import tokens_cases
from lorakit.bench.verdicts import compute_ratios


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
    }
    for pkg in ("transformers", "peft"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def resolve_device(device: str) -> str:
    """``auto`` → cuda when available, else cpu; any other name as given.

    Args:
        device: cpu, cuda or auto.
    """
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_cases(device: str, patterns: list[str], *, quick: bool = False, scaling: bool = False, repeats: int = 0,
               warmup: int = -1, threads: int = 0) -> list[Case]:  # fmt: skip
    """The cases a session runs, with the repeat, warm-up and thread overrides applied.

    Args:
        device: the resolved device.
        patterns: sections or id substrings (``--cases``); empty: the default suite.
        quick: the tiny smoke suite instead.
        scaling: add the model-size and rank sweep.
        repeats: timed repeats per case (0: each case's own).
        warmup: warm-up runs per case (negative: each case's own).
        threads: torch threads per case (0: each case's own).
    """
    if quick:
        cases: list[Case] = select(quick_cases(device), patterns)
    elif patterns:  # --cases picks from every section, the slow optional ones included
        cases = select(default_cases(device) + scaling_cases(device) + quality_cases(device) + tokens_cases(device),
                       patterns)  # fmt: skip
    else:
        cases = default_cases(device)
    if scaling and not quick:
        cases += [c for c in scaling_cases(device) if c not in cases]
    return [
        replace(c, repeats=repeats or c.repeats, warmup=c.warmup if warmup < 0 else warmup,
                threads=threads or c.threads)
        for c in cases
    ]


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from saved ones (``--render``), its ratios recomputed; later files win for a case id that
    appears twice (a re-run of some cases).

    Args:
        reports: parsed ``bench.json`` files, oldest first.
    """
    report = reports[0]
    if len(reports) > 1:
        merged = {r["id"]: r for rep in reports for r in rep["results"]}
        report["results"] = list(merged.values())
        report["meta"]["command"] = " + ".join(rep["meta"]["command"] for rep in reports)
        report["meta"]["date"] = " / ".join(dict.fromkeys(rep["meta"]["date"] for rep in reports))
        report["meta"]["loadavg_end"] = reports[-1]["meta"]["loadavg_end"]
    report["summary"] = compute_ratios(report["results"])
    return report


def run_cases(cases: list[Case], device: str, command: str, timeout: float) -> dict[str, Any]:
    """Run each case in a fresh subprocess, printing progress to stderr; the report with its ratios.

    Args:
        cases: the cases, in order.
        device: the resolved device (recorded with the machine).
        command: the command line, recorded in the report.
        timeout: seconds before a case is abandoned.
    """
    report: dict[str, Any] = {
        "meta": {
            "command": command,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(device),
            "loadavg_start": list(os.getloadavg()),
        },
        "results": [],
    }
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.id} ...", end=" ", file=sys.stderr, flush=True)
        result = run_in_subprocess(case, timeout)
        report["results"].append(result)
        if "error" in result:
            print(f"FAILED: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(f"{result['median_s'] * 1000:.1f} ms (load {result['loadavg_after'][0]:.1f})",
                  file=sys.stderr, flush=True)  # fmt: skip
    report["meta"]["loadavg_end"] = list(os.getloadavg())
    report["summary"] = compute_ratios(report["results"])
    return report


def write_report(report: dict[str, Any], out: Path) -> int:
    """``bench.json``, ``bench.md`` (also printed) and ``scaling.png`` when there are scaling cases.

    Args:
        report: the session's report.
        out: the output folder (created).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    plot = plot_scaling(report["results"], out / "scaling.png")
    text = render_markdown(report)
    if plot:
        text += f"\n![scaling]({plot.name})\n"
    (out / "bench.md").write_text(text)
    print(text)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {plot}" if plot else ""), file=sys.stderr)
    return 0
