"""``lorakit bench``: run the suite case by case (one subprocess each), then write a table, JSON and a plot.

lorakit bench                      # default suite, ~10 min on an idle 2-core CPU
lorakit bench --quick              # tiny smoke configuration, ~2 min
lorakit bench --cases pair,infer   # sections (train, pair, infer, mixed, merge, switch) or id substrings
lorakit bench --scaling            # also the model-size / rank sweep and its PNG (slow)
lorakit bench --render runs/bench/bench.json   # rebuild table and plot from saved results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from lorakit.bench.cases import (
    Case,
    default_cases,
    quality_cases,
    quick_cases,
    run_in_subprocess,
    scaling_cases,
    select,
)
from lorakit.bench.tokens import tokens_cases

TARGETS = {
    "like_for_like_time": 0.85,  # lorakit step / PEFT step, same precision and loss
    "default_speedup": 1.5,  # PEFT fp32 step / lorakit default step
    "default_memory": 0.6,  # lorakit default peak / PEFT fp32 peak
    "unmerged_overhead": 0.03,
    "merged_overhead": 0.02,  # plus the measured noise floor (base vs base)
    "mixed_over_single": 1.10,
    "tokens_over_peft": 1.3,  # useful tokens/s, lorakit length-grouped / PEFT plain loop
    "quality_rel_diff": 0.01,  # held-out loss within 1% of PEFT's after the same steps from the same start
}


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


# -- ratios and targets ----------------------------------------------------------------------------------
def _ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if "error" not in r]


def _find(results: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in _ok(results):
        if all(r["case"].get(k) == v for k, v in want.items()):
            return r
    return None


def _cpu_note(r: dict[str, Any], key: str | None = None) -> str:
    stats = r.get("ratio_stats", {})
    stats = stats.get(key, {}) if key else stats
    parts = []
    if "cpu_paired" in stats:
        parts.append(f"CPU-time ratio {stats['cpu_paired']:.3f}")
    if "of_min" in stats:
        parts.append(f"ratio of fastest runs {stats['of_min']:.3f}")
    return "; ".join(parts)


class _Checks(list):
    """Targets with their measured value and whether each is met (a row of the report's targets table)."""

    def check(self, name: str, value: float | None, limit: float, op: str, note: str = "") -> None:
        if value is None:
            return
        met = value <= limit if op == "<=" else value >= limit
        self.append({"target": name, "value": round(value, 4), "limit": f"{op} {limit:g}", "met": met, "note": note})


def _rel(r: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    return {
        "time": r["median_s"] / ref["median_s"],
        "cpu_time": cpu_median(r) / cpu_median(ref),
        "peak_rss": r["peak_rss_mb"] / ref["peak_rss_mb"],
        "step_memory": r["delta_rss_mb"] / max(ref["delta_rss_mb"], 1e-9),
    }


def _of_kind(results: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in _ok(results) if r["case"]["kind"] == kind]


def _train_memory_checks(c: dict[str, Any], entry: dict[str, Any], checks: _Checks) -> None:
    key = train_key(c)
    if c["loss"] == "model" and "vs_peft_same_precision" in entry:
        same = entry["vs_peft_same_precision"]
        checks.check(f"like-for-like peak RSS, {key}", same["peak_rss"], 1.0, "<=", "whole process")
        checks.check(f"like-for-like step memory, {key}", same["step_memory"], 1.0, "<=", "peak - loaded RSS")
    if c["loss"] == "labels" and "vs_peft_fp32" in entry:
        vs = entry["vs_peft_fp32"]
        what = f"lorakit {c['precision']} + labels-only loss{_compiled(c)} vs PEFT fp32, {c['model']}"
        limit = TARGETS["default_memory"]
        checks.check(f"default-vs-default peak RSS: {what}", vs["peak_rss"], limit, "<=",
                     "whole process, weights included")  # fmt: skip
        checks.check(f"default-vs-default step memory: {what}", vs["step_memory"], limit, "<=", "peak - loaded RSS")


def _train_ratios(results: list[dict[str, Any]], ratios: dict[str, Any], checks: _Checks) -> None:
    """Train rows, one process each: lorakit vs PEFT at the same precision, and vs PEFT's fp32 default."""
    for r in _of_kind(results, "train"):
        c = r["case"]
        if c["group"] != "train" or c["method"] != "lorakit":
            continue
        find = {"kind": "train", "group": "train", "model": c["model"], "method": "peft", "loss": "model"}
        entry: dict[str, Any] = {}
        for name, precision in (("vs_peft_same_precision", c["precision"]), ("vs_peft_fp32", "fp32")):
            ref = _find(results, **find, precision=precision)
            if ref:
                entry[name] = _rel(r, ref)
        ratios.setdefault("train", {})[train_key(c)] = entry
        _train_memory_checks(c, entry, checks)


def _pair_ratios(results: list[dict[str, Any]], ratios: dict[str, Any], checks: _Checks) -> None:
    """Paired rows: interleaved in one process, the ratio least disturbed by machine load."""
    for r in _of_kind(results, "pair"):
        c = r["case"]
        ratios.setdefault("pair", {})[f"{c['model']}/{c['id'].rsplit('/', 1)[-1]}"] = r.get(
            "ratio_stats", {"paired": r["ratio"]}
        )
        if "default" in c["id"]:
            what = f"PEFT fp32 / lorakit {c['precision']}, {c['loss']} loss{_compiled(c)}"
            checks.check(f"default-vs-default speed-up ({what}), {c['model']}", 1 / r["ratio"],
                         TARGETS["default_speedup"], ">=", _cpu_note(r))  # fmt: skip
        if c["precision"] == c["other"]["precision"] and not c.get("compile"):  # compiled is not like for like
            what = f"{c['precision']}, lorakit {c['loss']} loss / PEFT model loss"
            checks.check(f"same-precision step time ({what}), {c['model']}", r["ratio"],
                         TARGETS["like_for_like_time"], "<=", _cpu_note(r))  # fmt: skip


def _infer_ratios(results: list[dict[str, Any]], ratios: dict[str, Any], checks: _Checks) -> None:
    """Inference overheads over the plain model (paired); merged is allowed the base-vs-base noise."""
    rows = _of_kind(results, "infer")
    floors = {(r["case"]["model"], r["case"]["batch"]): r["overhead"] for r in rows if r["case"]["method"] == "base"}
    for r in rows:
        c = r["case"]
        name = f"{c['model']}/b{c['batch']}/{c['method']}-{c['mode']}"
        ratios.setdefault("infer_overhead", {})[name] = r["overhead"]
        if c["method"] != "lorakit":
            continue
        if c["mode"] == "unmerged":
            checks.check(f"unmerged forward overhead, {name}", r["overhead"], TARGETS["unmerged_overhead"], "<=",
                         _cpu_note(r))  # fmt: skip
        if c["mode"] == "merged":
            floor = abs(floors.get((c["model"], c["batch"]), 0.0))
            checks.check(f"merged forward overhead, {name}", r["overhead"], TARGETS["merged_overhead"] + floor, "<=",
                         f"limit = 2% + base-vs-base noise {floor:.1%}; " + _cpu_note(r))  # fmt: skip


def _mixed_ratios(results: list[dict[str, Any]], ratios: dict[str, Any], checks: _Checks) -> None:
    for r in _of_kind(results, "mixed"):
        c = r["case"]
        name = f"{c['model']}/{c['method']}/{c['n_adapters']}-adapters"
        ratios.setdefault("mixed_over_single", {})[name] = r["mixed_over_single"]
        if c["method"] == "lorakit" and c["n_adapters"] >= 32:
            checks.check(f"mixed batch / single adapter, {name}", r["mixed_over_single"],
                         TARGETS["mixed_over_single"], "<=", _cpu_note(r, "mixed_over_single"))  # fmt: skip


def _quality_and_tokens_checks(results: list[dict[str, Any]], checks: _Checks) -> None:
    for r in _ok(results):
        c = r["case"]
        if c["kind"] == "quality":
            checks.check(
                f"equal quality: held-out loss, lorakit {c['precision']} {c['loss']} loss / PEFT fp32, {c['model']}",
                abs(r["held_out_rel_diff"]), TARGETS["quality_rel_diff"], "<=", "absolute relative difference",
            )  # fmt: skip
        if c["kind"] == "tokens":
            checks.check(
                f"useful tokens/s, lorakit length-grouped / PEFT random batches, {c['model']} {c['data']}",
                r["grouped_over_peft"], TARGETS["tokens_over_peft"], ">=",
                "same steps from the same start; held-out losses in the tokens table",
            )  # fmt: skip
            _equal_loss_checks(r, checks)


def _equal_loss_checks(r: dict[str, Any], checks: _Checks) -> None:
    """The tokens case at equal held-out loss: lorakit's random batches are PEFT's batches (same loss), and
    grouping counts as loss-neutral only within what another shuffle alone moves the loss."""
    c = r["case"]
    checks.check(f"useful tokens/s at equal held-out loss, lorakit random / PEFT random batches, {c['model']} "
                 f"{c['data']}", r["random_over_peft"], TARGETS["tokens_over_peft"], ">=",
                 f"held-out loss differs by {r['random_loss_rel_diff']:+.2e}")  # fmt: skip
    checks.check(f"held-out loss, length-grouped / random batches - 1, {c['model']} {c['data']}",
                 r["grouped_loss_rel_diff"], abs(r["order_loss_rel_diff"]), "<=",
                 "limit: what another random shuffle alone moves it")  # fmt: skip


def compute_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """lorakit / PEFT ratios per comparison, and each target with its value and whether it is met.

    Args:
        results: the worker's result records (failed ones are skipped).
    """
    ratios: dict[str, Any] = {}
    checks = _Checks()
    _train_ratios(results, ratios, checks)
    _pair_ratios(results, ratios, checks)
    _infer_ratios(results, ratios, checks)
    _mixed_ratios(results, ratios, checks)
    _quality_and_tokens_checks(results, checks)
    for kind in ("merge", "switch"):
        mine = _find(results, kind=kind, method="lorakit")
        theirs = _find(results, kind=kind, method="peft")
        if mine and theirs:
            ratios[f"{kind}_time"] = mine["median_s"] / theirs["median_s"]
    return {"ratios": ratios, "targets": list(checks)}


# -- markdown --------------------------------------------------------------------------------------------
def cpu_median(r: dict[str, Any], key: str = "step") -> float:
    """Median CPU seconds per call of ``key`` in a result (nan when not recorded)."""
    values = r.get("cpu_times", {}).get(key)
    return statistics.median(values) if values else float("nan")


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def _load(r: dict[str, Any]) -> str:
    return f"{r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}"


def _header(report: dict[str, Any]) -> list[str]:
    """Command, date, machine and load."""
    meta = report["meta"]
    m = meta["machine"]
    return [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']}), device {m['device']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}  ",
        f"Load average (1/5/15 min) at start {_fmt_load(meta['loadavg_start'])}, "
        f"at end {_fmt_load(meta['loadavg_end'])}; per row: 1-min load before/after the case.",
        "",
    ]


def _train_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Train step rows, one process each, with the ratios against PEFT."""
    out: list[str] = []
    train = [r for r in _ok(results) if r["case"]["kind"] == "train" and r["case"]["group"] == "train"]
    if train:
        c0 = train[0]["case"]
        out += [
            f"### Train step (forward + backward + AdamW), batch {c0['batch']} x {c0['seq']}",
            "",
            "| model | method | precision | loss | median s | min s | CPU s | vs PEFT same precision | "
            "vs PEFT fp32 | peak RSS MB | step mem MB | trainable | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        ratios = report["summary"]["ratios"].get("train", {})
        for r in train:
            c = r["case"]
            entry = ratios.get(train_key(c), {}) if c["method"] == "lorakit" else {}
            cols = []
            for k in ("vs_peft_same_precision", "vs_peft_fp32"):
                v = entry.get(k)
                cols.append(
                    f"{v['time']:.2f}x wall, {v['cpu_time']:.2f}x CPU, {v['step_memory']:.2f}x step mem, "
                    f"{v['peak_rss']:.2f}x peak"
                    if v
                    else ""
                )
            out.append(
                f"| {c['model']} | {_method_label(c)} | {c['precision']} | {c['loss']} | "
                f"{r['median_s']:.3f} | {r['min_s']:.3f} | {cpu_median(r):.3f} | {cols[0]} | {cols[1]} | "
                f"{r['peak_rss_mb']:.0f} | "
                f"{r['delta_rss_mb']:.0f} | {r['trainable']:,} | {_load(r)} |"
            )
        out += [
            "",
            "step mem = peak RSS during the measured steps minus RSS once the model was loaded and set up. "
            "CPU s = median CPU seconds of the process per step (with one thread: the work, without the "
            "time spent waiting for a core).",
            "loss `labels` = `lorakit.lora.kernels.causal_lm_loss` (LM head + softmax only where labels are, "
            f"chunked; {train[0].get('labelled_fraction', 0):.0%} of positions are labelled, E2E-style "
            "packing); `model` = `model(**batch, labels=...).loss`.",
            "GPT-2: lorakit adapts the q and v thirds of `c_attn` with one rank-r pair each (as the paper); "
            "PEFT can only adapt all of `c_attn` with one rank-r pair spanning q, k and v. Same parameter "
            "count and FLOPs, different update.",
            "",
        ]
    return out


def _pairs_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """lorakit vs PEFT interleaved in one process."""
    out: list[str] = []
    pairs = [r for r in _ok(results) if r["case"]["kind"] == "pair"]
    if pairs:
        out += [
            "### lorakit vs PEFT, interleaved in one process on shared frozen weights",
            "",
            "| model | comparison | lorakit | PEFT | lorakit median s | PEFT median s | paired ratio | "
            "ratio of mins | CPU-time ratio | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in pairs:
            c, o = r["case"], r["case"]["other"]
            st = r.get("ratio_stats", {})
            out.append(
                f"| {c['model']} | {c['id'].rsplit('/', 1)[-1]} | {c['precision']}, {c['loss']} loss{_compiled(c)} | "
                f"{o['precision']}, {o['loss']} loss | {r['mine']['median_s']:.3f} | "
                f"{r['other']['median_s']:.3f} | {r['ratio']:.3f} | {st.get('of_min', float('nan')):.3f} | "
                f"{st.get('cpu_paired', float('nan')):.3f} | {_load(r)} |"
            )
        out += [
            "",
            "ratio = lorakit / PEFT step time (< 1: lorakit faster). CPU-time ratio uses this process's CPU "
            "seconds per step, which waiting for a busy core does not inflate.",
            "",
        ]
    return out


def _infer_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Inference forward: each variant against the plain model."""
    out: list[str] = []
    infer = [r for r in _ok(results) if r["case"]["kind"] == "infer"]
    if infer:
        out += [
            f"### Inference forward, seq {infer[0]['case']['seq']}",
            "",
            "| model | batch | variant | median ms | min ms | plain model median ms | overhead (paired) | "
            "peak RSS MB | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in infer:
            c = r["case"]
            variant = "plain model (noise floor)" if c["method"] == "base" else f"{c['method']} {c['mode']}"
            out.append(
                f"| {c['model']} | {c['batch']} | {variant} | {_ms(r['median_s'])} | {_ms(r['min_s'])} | "
                f"{_ms(r['base']['median_s'])} | {r['overhead']:+.1%} | {r['peak_rss_mb']:.0f} | {_load(r)} |"
            )
        out.append("")
    return out


def _mixed_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Mixed-adapter batches against one adapter and the plain model."""
    out: list[str] = []
    mixed = [r for r in _ok(results) if r["case"]["kind"] == "mixed"]
    if mixed:
        c0 = mixed[0]["case"]
        out += [
            f"### Mixed-adapter batches ({c0['batch']} x {c0['seq']} tokens, r={c0['r']} on "
            f"{', '.join(c0['targets'])})",
            "",
            "| model | library | adapters | mixed ms | one adapter ms | plain model ms | mixed / one | "
            "mixed / plain | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mixed:
            c = r["case"]
            out.append(
                f"| {c['model']} | {c['method']} | {c['n_adapters']} | {_ms(r['median_s'])} | "
                f"{_ms(r['single']['median_s'])} | {_ms(r['base']['median_s'])} | "
                f"{r['mixed_over_single']:.2f} | {r['mixed_over_base']:.2f} | {_load(r)} |"
            )
        out.append("")
    return out


def _ops_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Merge / unmerge and load-and-switch."""
    out: list[str] = []
    ops = [r for r in _ok(results) if r["case"]["kind"] in ("merge", "switch")]
    if ops:
        out += [
            "### Merge / unmerge (all adapted layers) and load-and-switch to an adapter file",
            "",
            "| model | library | operation | median ms | min ms | load |",
            "|---|---|---|---|---|---|",
        ]
        for r in ops:
            c = r["case"]
            targets = f"r={c['r']} on {', '.join(c['targets'])}"
            if c["kind"] == "merge":
                out.append(
                    f"| {c['model']} | {c['method']} | merge ({targets}) | {_ms(r['median_s'])} | "
                    f"{_ms(r['min_s'])} | {_load(r)} |"
                )
                if "merge_unchecked" in r:
                    u = r["merge_unchecked"]
                    out.append(
                        f"| {c['model']} | {c['method']} | merge(check=False) | {_ms(u['median_s'])} | "
                        f"{_ms(u['min_s'])} | {_load(r)} |"
                    )
                out.append(
                    f"| {c['model']} | {c['method']} | unmerge | {_ms(r['unmerge']['median_s'])} | "
                    f"{_ms(r['unmerge']['min_s'])} | {_load(r)} |"
                )
            else:
                out.append(
                    f"| {c['model']} | {c['method']} | load file + switch ({targets}) | "
                    f"{_ms(r['median_s'])} | {_ms(r['min_s'])} | {_load(r)} |"
                )
        out.append("")
    return out


def _scaling_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Train steps across model sizes."""
    out: list[str] = []
    scaling = [r for r in _ok(results) if r["case"]["group"] == "scaling"]
    if scaling:
        out += [
            "### Scaling (train step, batch 4 x 128)",
            "",
            "| model | params | method | precision | loss | r | trainable | median s | CPU s | peak RSS MB | "
            "step mem MB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in scaling:
            c = r["case"]
            out.append(
                f"| {c['model']} | {r['params'] / 1e6:.0f}M | {c['method']} | {c['precision']} | "
                f"{c['loss']} | {c['r']} | {r['trainable']:,} | {r['median_s']:.3f} | {cpu_median(r):.3f} | "
                f"{r['peak_rss_mb']:.0f} | {r['delta_rss_mb']:.0f} | {_load(r)} |"
            )
        out.append("")
    return out


def _quality_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Equal-quality runs: train and held-out losses."""
    out: list[str] = []
    quality = [r for r in _ok(results) if r["case"]["kind"] == "quality"]
    if quality:
        out += [
            "### Equal quality: same start, same E2E batches, AdamW lr 1e-3",
            "",
            "| model | lorakit | PEFT | steps | start loss | lorakit final train loss | "
            "PEFT final train loss | lorakit held-out loss | PEFT held-out loss | held-out difference |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in quality:
            c, o = r["case"], r["case"]["other"]
            out.append(
                f"| {c['model']} | {c['precision']}, {c['loss']} loss | {o['precision']}, {o['loss']} loss "
                f"| {c['repeats']} | {r['start_loss']:.4f} | {r['final_train_loss']['mine']:.4f} | "
                f"{r['final_train_loss']['other']:.4f} | {r['held_out_loss']['mine']:.4f} | "
                f"{r['held_out_loss']['other']:.4f} | {r['held_out_rel_diff']:+.2%} |"
            )
        out += [
            "",
            "final train loss = mean of the last 5 steps; held-out loss in fp32 on an unseen batch.",
            "",
        ]
    return out


def _checks_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Every target with its value and whether it is met."""
    out: list[str] = []
    checks = report["summary"]["targets"]
    if checks:
        out += ["### Targets", "", "| target | value | limit | met | note |", "|---|---|---|---|---|"]
        out += [
            f"| {t['target']} | {t['value']:.3f} | {t['limit']} | {'yes' if t['met'] else '**no**'} | {t['note']} |"
            for t in checks
        ]
        out.append("")
    return out


def _errors_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Cases that failed."""
    out: list[str] = []
    errors = [r for r in results if "error" in r]
    if errors:
        out += ["### Failed cases", ""] + [f"- `{r['id']}`: {r['error']}" for r in errors] + [""]
    return out


SECTIONS = (
    _train_section, _pairs_section, _infer_section, _mixed_section, _ops_section, _scaling_section,
    _quality_section, lambda results, report: _tokens_table(results), _checks_section, _errors_section,
)  # the report's tables, in order


def render_markdown(report: dict[str, Any]) -> str:
    """The bench report as Markdown: a header, then one table per kind of case present, then the targets.

    Args:
        report: ``{"meta", "results", "summary"}`` as ``bench_main`` writes it.
    """
    out = _header(report)
    for section in SECTIONS:
        out += section(report["results"], report)
    return "\n".join(out)


def _fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def train_key(c: dict[str, Any]) -> str:
    return f"{c['model']}/{c['precision']}/{c['loss']}-loss" + ("/compiled" if c.get("compile") else "")


def _compiled(c: dict[str, Any]) -> str:
    return " + compile" if c.get("compile") else ""


def _method_label(c: dict[str, Any]) -> str:
    if c["method"] == "full":
        return "full FT"
    label = f"{c['method']} LoRA"
    if c["method"] == "lorakit" and c["loss"] == "labels" and c["precision"] == "fp32":
        # the trainer's default precision is fp32; --compile is its opt-in for long runs
        label += " (default path + --compile)" if c.get("compile") else " (default path)"
    return label


# -- plot ------------------------------------------------------------------------------------------------
def plot_scaling(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Train-step time and memory vs model size, and vs rank: one PNG with four panels."""
    rows = [r for r in _ok(results) if r["case"]["group"] == "scaling"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    size_rows = [r for r in rows if "/size/" in r["id"]]
    rank_rows = [r for r in rows if "/rank/" in r["id"]]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in size_rows:
        c = r["case"]
        series.setdefault(f"{c['method']} {c['precision']} {c['loss']}-loss", []).append(r)
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["params"])
        x = [r["params"] / 1e6 for r in rs]
        line = axes[0][0].plot(x, [r["median_s"] for r in rs], "o-", label=f"{label} (wall)")[0]
        axes[0][0].plot(x, [cpu_median(r) for r in rs], ":", color=line.get_color(), label=f"{label} (CPU)")
        axes[0][1].plot(x, [r["peak_rss_mb"] for r in rs], "o-", label=f"{label} (peak RSS)")
        axes[0][1].plot(x, [r["delta_rss_mb"] for r in rs], "x--", label=f"{label} (step memory)")
    sizes = sorted({r["params"] / 1e6 for r in size_rows})
    for ax, ylabel in ((axes[0][0], "train step, s"), (axes[0][1], "MB")):
        ax.set_xscale("log")
        # One labelled tick per model size; log-axis minor labels would overlap.
        ax.set_xticks(sizes, [f"{s:.0f}M" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("parameters, GPT-2 configs (layers x width: see the table)")
        ax.set_ylabel(ylabel)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rank_rows:
        by_method.setdefault(r["case"]["method"], []).append(r)
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["case"]["r"])
        x = [r["case"]["r"] for r in rs]
        line = axes[1][0].plot(x, [r["median_s"] for r in rs], "o-", label=f"{method} (wall)")[0]
        axes[1][0].plot(x, [cpu_median(r) for r in rs], ":", color=line.get_color(), label=f"{method} (CPU)")
        axes[1][1].plot(x, [r["peak_rss_mb"] for r in rs], "o-", label=f"{method} (peak RSS)")
        axes[1][1].plot(x, [r["delta_rss_mb"] for r in rs], "x--", label=f"{method} (step memory)")
    for ax, ylabel in ((axes[1][0], "train step, s"), (axes[1][1], "MB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r (gpt2-124m, fp32)")
        ax.set_ylabel(ylabel)
    for ax in axes.flat:
        ax.set_ylim(bottom=0)  # from zero: differences of a few percent should look like that
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("LoRA train step (batch 4 x 128): time and memory vs model size and rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- main ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakit bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (every kind once)")
    p.add_argument("--cases", default="", help="comma-separated sections or id substrings to run")
    p.add_argument("--scaling", action="store_true", help="add the model-size and rank sweep (slow) and its plot")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md and scaling.png")
    p.add_argument("--repeats", type=int, default=0, help="override timed repeats per case")
    p.add_argument("--warmup", type=int, default=-1, help="override warm-up runs per case")
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a case is abandoned")
    p.add_argument("--list", action="store_true", help="print the selected case ids and exit")
    p.add_argument(
        "--render",
        metavar="JSON",
        nargs="+",
        help="only re-render the table and plot from bench.json files (results are merged)",
    )
    return p


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "serve":  # `lorakit bench serve`: the server load generator (lorakit.bench.serve_load)
        from lorakit.bench.serve_load import bench_serve_main

        return bench_serve_main(argv[1:])
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if args.render:
        reports = [json.loads(Path(path).read_text()) for path in args.render]
        report = reports[0]
        if len(reports) > 1:
            # Later files win for a case id that appears twice (a re-run of some cases).
            merged = {r["id"]: r for rep in reports for r in rep["results"]}
            report["results"] = list(merged.values())
            report["meta"]["command"] = " + ".join(rep["meta"]["command"] for rep in reports)
            report["meta"]["date"] = " / ".join(dict.fromkeys(rep["meta"]["date"] for rep in reports))
            report["meta"]["loadavg_end"] = reports[-1]["meta"]["loadavg_end"]
        report["summary"] = compute_ratios(report["results"])
        return _write(report, out)
    device = _resolve_device(args.device)
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    if args.quick:
        cases: list[Case] = select(quick_cases(device), patterns)
    elif patterns:  # --cases picks from every section, the slow optional ones included
        cases = select(default_cases(device) + scaling_cases(device) + quality_cases(device) + tokens_cases(device),
                       patterns)  # fmt: skip
    else:
        cases = default_cases(device)
    if args.scaling and not args.quick:
        cases += [c for c in scaling_cases(device) if c not in cases]
    cases = [
        replace(
            c,
            repeats=args.repeats or c.repeats,
            warmup=c.warmup if args.warmup < 0 else args.warmup,
            threads=args.threads or c.threads,
        )
        for c in cases
    ]
    if args.list:
        print("\n".join(c.id for c in cases))
        return 0
    if not cases:
        print("lorakit bench: no case matches --cases", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "meta": {
            "command": "lorakit bench " + shlex.join(argv if argv is not None else sys.argv[2:]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(device),
            "loadavg_start": list(os.getloadavg()),
        },
        "results": [],
    }
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.id} ...", end=" ", file=sys.stderr, flush=True)
        result = run_in_subprocess(case, args.timeout)
        report["results"].append(result)
        if "error" in result:
            print(f"FAILED: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(
                f"{result['median_s'] * 1000:.1f} ms (load {result['loadavg_after'][0]:.1f})",
                file=sys.stderr,
                flush=True,
            )
    report["meta"]["loadavg_end"] = list(os.getloadavg())
    report["summary"] = compute_ratios(report["results"])
    code = _write(report, out)
    return code or (1 if any("error" in r for r in report["results"]) else 0)


def _write(report: dict[str, Any], out: Path) -> int:
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


def _tokens_table(results: list[dict[str, Any]]) -> list[str]:
    """The useful-tokens section: tokens/s, padding and held-out loss of each side."""
    rows = [r for r in _ok(results) if r["case"]["kind"] == "tokens"]
    if not rows:
        return []
    out = ["### Useful tokens per second: length-grouped vs random batches vs PEFT (same start, same steps)", "",
           "| model | data | side | useful tok/s | padding | median step s | held-out loss |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c = r["case"]
        for side, v in r["sides"].items():
            out.append(f"| {c['model']} | {c['data']} | {side} | {v['useful_tok_s']:.0f} | {v['pad_share']:.1%} | "
                       f"{v['median_s']:.2f} | {v['held_out_loss']:.4f} |")  # fmt: skip
    return [*out, "", "PEFT runs its plain loop (model(labels=...).loss); lorakit its default path.", ""]
