"""The bench's verdicts: ratios of lorakit to PEFT per configuration, and each target with whether it is met."""

from __future__ import annotations

import statistics
from typing import Any

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



def cpu_median(r: dict[str, Any], key: str = "step") -> float:
    """Median CPU seconds per call of ``key`` in a result (nan when not recorded)."""
    values = r.get("cpu_times", {}).get(key)
    return statistics.median(values) if values else float("nan")


def train_key(c: dict[str, Any]) -> str:
    """A train case's key in the ratios: model/precision/loss[/compiled]."""
    return f"{c['model']}/{c['precision']}/{c['loss']}-loss" + ("/compiled" if c.get("compile") else "")


def compiled_note(c: dict[str, Any]) -> str:
    """" + compile" for a compiled case, else nothing (appended to labels)."""
    return " + compile" if c.get("compile") else ""


def ok_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results that finished (a failed case carries ``error``)."""
    return [r for r in results if "error" not in r]


def _find(results: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in ok_results(results):
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
    return [r for r in ok_results(results) if r["case"]["kind"] == kind]


def _train_memory_checks(c: dict[str, Any], entry: dict[str, Any], checks: _Checks) -> None:
    key = train_key(c)
    if c["loss"] == "model" and "vs_peft_same_precision" in entry:
        same = entry["vs_peft_same_precision"]
        checks.check(f"like-for-like peak RSS, {key}", same["peak_rss"], 1.0, "<=", "whole process")
        checks.check(f"like-for-like step memory, {key}", same["step_memory"], 1.0, "<=", "peak - loaded RSS")
    if c["loss"] == "labels" and "vs_peft_fp32" in entry:
        vs = entry["vs_peft_fp32"]
        what = f"lorakit {c['precision']} + labels-only loss{compiled_note(c)} vs PEFT fp32, {c['model']}"
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
            what = f"PEFT fp32 / lorakit {c['precision']}, {c['loss']} loss{compiled_note(c)}"
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
    for r in ok_results(results):
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
