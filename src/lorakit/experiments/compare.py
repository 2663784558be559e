"""`lorakit compare`: methods x seeds on one task, a table in the paper's shape and a metric-vs-size plot.

Each run is an ordinary training run (``lorakit.training.train``) in ``OUT/<method spec>/seed-<S>``.
A run whose ``eval_results.json`` exists is skipped (after checking it was made with the same settings),
a run that stopped half way resumes from its last checkpoint, so an interrupted comparison is finished by
running the same command again. A method spec is ``NAME[:key=value[:key=value...]]``: keys that are
training settings (``r``, ``lr``, ``targets`` ...) override them for that method, other keys are method
options (``bottleneck``, ``length`` ...) passed as ``method_options``. Outputs, in OUT: ``compare.md``,
``compare.png``, ``compare.json`` (every run).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, LorakitError
from lorakit.io.outputs import write_file_atomically

TABLE = "compare.md"
PLOT = "compare.png"
RUNS = "compare.json"
RESULTS = "eval_results.json"  # what a training run writes last, when it is complete
TRAIN_CONFIG = "train_config.json"
SPREADS = ("std", "halfrange")
CONTROLLED = ("method", "seed", "out")  # set by compare for every run, never passed through


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a method with its settings."""

    label: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for this method
    options: dict[str, str] = field(default_factory=dict)  # method options (method_options)

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", self.label.replace(":", "__"))


def train_fields() -> list[str]:
    from lorakit.training.config import TrainConfig

    return TrainConfig.field_names()


def parse_spec(text: str, train_fields: Sequence[str]) -> MethodSpec:
    name, *pairs = [p.strip() for p in text.split(":")]
    if not name:
        raise ConfigError(f"method spec {text!r} has no method name")
    settings: dict[str, Any] = {}
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"method spec {text!r}: {pair!r} must look like key=value")
        if key in CONTROLLED:
            raise ConfigError(f"method spec {text!r}: {key} is set by compare itself")
        (settings if key in train_fields else options)[key] = value.strip()
    return MethodSpec(text.strip(), name, settings, options)


def known_methods() -> list[str]:
    """Method names the trainer can run (the method registry's)."""
    from lorakit.methods import known_methods as registered

    return registered()


def run_training(config: dict[str, Any], *, resume: bool, overwrite: bool) -> dict[str, float]:
    """One training run through the pipeline's API (tests replace this)."""
    from lorakit.training import TrainConfig, train

    return train(TrainConfig.from_dict(config, source="compare"), resume=resume, overwrite=overwrite)


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    from lorakit.training.config import TrainConfig

    return TrainConfig.from_dict(config, source="compare").to_dict()


def _run_config(spec: MethodSpec, seed: int, base: dict[str, Any], run_dir: Path, fields: Sequence[str]):
    config = {**base, **spec.settings, "method": spec.method, "seed": seed, "out": str(run_dir)}
    if spec.options:
        if "method_options" not in fields:
            raise ConfigError(
                f"{spec.label}: {sorted(spec.options)} are method options, but this training pipeline has no "
                "method_options setting to pass them through"
            )
        config["method_options"] = [f"{k}={v}" for k, v in spec.options.items()]
    return _normalised(config)


def trainable_count(run_dir: Path) -> int | None:
    """Trainable parameters of a finished run, read from the files it saved."""
    from lorakit.methods.io import CONFIG_NAME
    from lorakit.training.outputs import LEGACY_CONFIG

    for name, key in ((CONFIG_NAME, "tensors"), (LEGACY_CONFIG, "parameters")):
        state = run_dir / name
        if state.is_file():
            shapes = json.loads(state.read_text()).get(key, {})
            return sum(math.prod(s) for s in shapes.values())
    adapter = run_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as fh:
            return sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    return None


def _same_settings(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    from lorakit.training.prepare import RESUME_MAY_CHANGE

    # A field the saved run predates cannot have differed: only compare the ones it recorded.
    ignored = {*RESUME_MAY_CHANGE, "out"}
    return [k for k in wanted if k not in ignored and k in saved and saved[k] != wanted[k]]


def run_compare(
    specs: Sequence[MethodSpec],
    seeds: Sequence[int],
    base: dict[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Run (or skip, or resume) every method x seed; one record per run, also saved as compare.json.

    Args:
        specs: the methods to compare.
        seeds: each method runs once per seed.
        base: the training settings every run shares.
        out: the comparison's folder (one run folder per method and seed below it).
        overwrite: retrain runs that finished or hold other settings.
        log: receives a progress line per run.
    """
    out = Path(out)
    known = known_methods()
    unknown = sorted({s.method for s in specs if s.method not in known})
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {', '.join(known)}")
    if len({s.dirname for s in specs}) != len(specs):
        raise ConfigError("two method specs map to the same run directory; make them differ")
    # Every config is built (and validated) before the first run starts: a typo fails now, not hours in.
    fields = train_fields()
    plan = [(spec, seed, out / spec.dirname / f"seed-{seed}") for spec in specs for seed in seeds]
    configs = [_run_config(spec, seed, base, run_dir, fields) for spec, seed, run_dir in plan]
    if not overwrite:
        for (_, _, run_dir), config in zip(plan, configs):
            _refuse_other_settings(run_dir, config)
    records = [_run_one(spec, seed, run_dir, config, overwrite, log)
               for (spec, seed, run_dir), config in zip(plan, configs)]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / RUNS, json.dumps(records, indent=2))
    return records


def _refuse_other_settings(run_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to reuse a run folder whose saved settings differ from ``config``."""
    saved = run_dir / TRAIN_CONFIG
    if not saved.is_file():
        return
    changed = _same_settings(json.loads(saved.read_text()), config)
    if changed:
        state = "finished" if (run_dir / RESULTS).is_file() else "unfinished"
        raise ConfigError(
            f"{run_dir} holds a {state} run with other settings ({', '.join(changed)}); "
            "pass --overwrite or choose another --out"
        )


def _run_one(spec: MethodSpec, seed: int, run_dir: Path, config: dict[str, Any], overwrite: bool,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Train (resume, or skip when finished) one method x seed; its record, ``failed`` with the error if it fails."""
    record: dict[str, Any] = {
        "label": spec.label, "method": spec.method, "seed": seed, "model": config.get("model"),
        "task": config.get("task"), "dir": str(run_dir),
    }
    done = run_dir / RESULTS
    try:
        if done.is_file() and not overwrite:
            record["status"] = "skipped"
            metrics = json.loads(done.read_text())
            log(f"compare: {spec.label} seed {seed}: already done, skipped")
        else:
            resume = (run_dir / TRAIN_CONFIG).is_file() and not overwrite
            log(f"compare: {spec.label} seed {seed}: {'resuming' if resume else 'training'} in {run_dir}")
            metrics = run_training(config, resume=resume, overwrite=overwrite)
            record["status"] = "resumed" if resume else "trained"
        record["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        record["trainable"] = trainable_count(run_dir)
    except LorakitError as exc:  # one method failing (BitFit on a bias-free model) must not stop the rest
        record.update(status="failed", error=str(exc))
        log(f"compare: {spec.label} seed {seed}: FAILED: {exc}")
    return record


# -- the table and the plot -----------------------------------------------------------------------------


def _spread(values: list[float], kind: str) -> float:
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) if kind == "std" else (max(values) - min(values)) / 2


def summarise(records: Sequence[dict[str, Any]], spread: str = "std") -> list[dict[str, Any]]:
    """One row per method spec (in run order): trainable params, and per metric (median, spread, n)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:
        empty = {"label": rec["label"], "method": rec["method"], "trainable": None, "metrics": {}, "seeds": 0,
                 "failed": []}
        row = rows.setdefault(rec["label"], empty)
        if rec["status"] == "failed":
            row["failed"].append(f"seed {rec['seed']}: {rec['error']}")
            continue
        row["seeds"] += 1
        if rec.get("trainable") is not None:
            row["trainable"] = rec["trainable"]
        for name, value in rec["metrics"].items():
            row["metrics"].setdefault(name, []).append(value)
    for row in rows.values():
        row["metrics"] = {
            k: {"median": statistics.median(v), "spread": _spread(v, spread), "n": len(v)}
            for k, v in row["metrics"].items()
        }
    return list(rows.values())


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 100_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1_000 else str(n)


def _value(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 10 else f"{x:.4f}"


def format_table(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None, spread: str = "std"
) -> str:
    """Markdown: method | trainable params | seeds | each metric as median ± spread."""
    if metrics is None:
        metrics = list(dict.fromkeys(k for row in rows for k in row["metrics"]))
    lines = [
        "| method | trainable params | seeds | " + " | ".join(metrics) + " |",
        "|---|---:|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        cells = []
        for name in metrics:
            m = row["metrics"].get(name)
            cells.append("–" if m is None else f"{_value(m['median'])} ± {_value(m['spread'])}")
        seeds = str(row["seeds"]) + (f" ({len(row['failed'])} failed)" if row["failed"] else "")
        lines.append(f"| {row['label']} | {_count(row['trainable'])} | {seeds} | " + " | ".join(cells) + " |")
    what = "sample standard deviation" if spread == "std" else "half the range"
    lines += ["", f"Median over seeds ± {what}."]
    failures = [f"- {row['label']}, {f}" for row in rows for f in row["failed"]]
    if failures:
        lines += ["", "Failed runs:", *failures]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], metric: str, path: Path, title: str = "") -> bool:
    """``metric`` (median, spread as error bar) against trainable parameters, log x; a line per method."""
    points = [r for r in rows if r["trainable"] and metric in r["metrics"]]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in points):
        mine = sorted((r for r in points if r["method"] == method), key=lambda r: r["trainable"])
        xs = [r["trainable"] for r in mine]
        ys = [r["metrics"][metric]["median"] for r in mine]
        errs = [r["metrics"][metric]["spread"] for r in mine]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method)
        for r, x, y in zip(mine, xs, ys):
            if r["label"] != method:
                ax.annotate(r["label"].split(":", 1)[1], (x, y), fontsize=7, textcoords="offset points",
                            xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def _write_atomic(path: Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_outputs(
    records: Sequence[dict[str, Any]],
    out: Path,
    *,
    spread: str = "std",
    metrics: Sequence[str] | None = None,
    plot_metric: str | None = None,
    title: str = "",
) -> str:
    """compare.md (returned too) and compare.png from run records."""
    rows = summarise(records, spread)
    table = format_table(rows, metrics, spread)
    heading = f"# {title}\n\n" if title else ""
    _write_atomic(out / TABLE, heading + table + "\n")
    available = list(dict.fromkeys(k for row in rows for k in row["metrics"]))
    metric = plot_metric or next(iter(metrics or available), None)
    if metric is not None:
        if metric not in available:
            raise ConfigError(f"plot metric {metric!r} is not among the results' metrics {available}")
        plot(rows, metric, out / PLOT, title)
    return table
