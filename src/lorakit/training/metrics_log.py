"""A run's record: ``metrics.jsonl`` (one JSON object per line), the trackers of ``report_to``, and the PNG plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.training.config import json_safe
from lorakit.training.outputs import METRICS_LOG, TENSORBOARD_DIR
from lorakit.training.tracking import open_trackers


class MetricsLog:
    """metrics.jsonl (one JSON object per line) plus the trackers of ``report_to``, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, trackers: list[str], config: dict[str, Any] | None = None) -> None:
        self.path = out / METRICS_LOG
        self.enabled = enabled
        self.trackers = open_trackers(trackers, out, config or {}, TENSORBOARD_DIR) if enabled and trackers else []

    def truncate_after(self, step: int) -> None:
        """Drop records newer than a checkpoint being resumed (and a line cut short by a kill)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # strict JSON: null, never NaN
        for tracker in self.trackers:
            tracker.log_record(record)

    def log_final(self, metrics: dict[str, Any], files: list[Path], plot: Path | None) -> None:
        """Hand the final scores, the published files and the plot to the trackers."""
        for tracker in self.trackers:
            tracker.log_final(metrics, files, plot)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def plot_history(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and the validation metrics against the step, as a PNG (no display needed)."""
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", label="train loss")
    if valid and "loss" in valid[0]:
        ax_loss.plot([r["step"] for r in valid], [r["loss"] for r in valid], marker="o", label="valid loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    names = sorted(
        {k for r in valid for k, v in r.items() if isinstance(v, float) and k not in ("loss", "epoch")}
    )
    for name in names:
        pts = [(r["step"], r[name]) for r in valid if isinstance(r.get(name), float)]
        ax_metric.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel("validation metric")
    if names:
        ax_metric.legend()
    fig.suptitle(title)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
