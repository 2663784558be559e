"""A run's record: ``metrics.jsonl`` (one JSON object per line), optional TensorBoard, and the PNG plot."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lorakit.training.config import json_safe
from lorakit.training.outputs import METRICS_LOG, TENSORBOARD_DIR


class MetricsLog:
    """metrics.jsonl (one JSON object per line) plus optional TensorBoard, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = out / METRICS_LOG
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / TENSORBOARD_DIR))
            except ImportError:
                print(
                    "lorakit train: tensorboard is not installed; skipping event files "
                    "(pip install tensorboard)",
                    file=sys.stderr,
                )

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
        if self.writer is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
