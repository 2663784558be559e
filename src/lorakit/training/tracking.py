"""Runs recorded where teams look (``report_to``): TensorBoard, MLflow and Weights & Biases, each through its
own library, on rank 0 only.

Each tracker gets the run's settings once, every ``metrics.jsonl`` record as it is written (``split/name``
at its step), and at the end the final scores, the training plot and (MLflow) the published adapter as an
artifact. MLflow writes to ``MLFLOW_TRACKING_URI`` or, without it, to a file store in ``<out>/mlruns``;
W&B runs offline into ``<out>/wandb`` unless ``WANDB_API_KEY`` or ``WANDB_MODE`` says otherwise. Their
banners and log lines are kept off the terminal: a run prints lorakit's lines only.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from lorakit.errors import ConfigError

TRACK_EXTRA = "pip install 'lorakit[track]'"
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}
EXPERIMENT = "lorakit"


class Tracker(Protocol):
    def log_record(self, record: dict[str, Any]) -> None: ...
    def log_final(self, metrics: dict[str, Any], files: list[Path], plot: Path | None) -> None: ...
    def close(self) -> None: ...


def requested(cfg_report_to: list[str] | None, tensorboard: bool) -> list[str]:
    """The trackers to open: ``report_to`` plus ``tensorboard`` when the older ``--tensorboard`` is on.

    Args:
        cfg_report_to: the ``report_to`` setting.
        tensorboard: the ``tensorboard`` setting (an alias of ``report_to tensorboard``).
    """
    names = list(dict.fromkeys(cfg_report_to or []))
    return [*names, "tensorboard"] if tensorboard and "tensorboard" not in names else names


def check_installed(names: list[str]) -> None:
    """Fail before any model is loaded when a tracker's package is missing.

    Args:
        names: tracker names (``requested``).

    Raises:
        ConfigError: naming the tracker and the extra to install.
    """
    for name in names:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            package = PACKAGES[name]
            raise ConfigError(f"report_to {name}: the {package} package is not installed ({TRACK_EXTRA})") from None


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """``split/name`` -> value for the record's numbers (not its step and epoch).

    Args:
        record: one ``metrics.jsonl`` record.
    """
    prefix = record.get("split", "train")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}  # fmt: skip


def quiet_third_party() -> None:
    """Keep MLflow's and W&B's log lines, banners and warnings off the terminal."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    for name in ("mlflow", "wandb", "alembic", "git"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("mlflow", "wandb", "pydantic", "google.protobuf"):
        warnings.filterwarnings("ignore", module=module)


class TensorBoardTracker:
    def __init__(self, out: Path, folder: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / folder))

    def log_record(self, record: dict[str, Any]) -> None:
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def log_final(self, metrics: dict[str, Any], files: list[Path], plot: Path | None) -> None:
        if plot is not None and plot.is_file():
            from matplotlib.image import imread

            self.writer.add_image("training_plot", imread(plot)[..., :3], dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store beside the run; MLflow 3 asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=out.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_record(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(record["step"])) for k, v in numeric(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_final(self, metrics: dict[str, Any], files: list[Path], plot: Path | None) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path="adapter")
        if plot is not None and plot.is_file():
            self.client.log_artifact(self.run_id, str(plot))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import wandb

        offline = not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE")
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT), name=out.name, dir=str(out), config=config,
            mode="offline" if offline else None, settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip

    def log_record(self, record: dict[str, Any]) -> None:
        values = numeric(record)
        if record.get("split") in ("eval", "select"):  # final values, at a step that may lie behind
            self.run.summary.update(values)
        elif values:
            self.run.log(values, step=int(record["step"]))

    def log_final(self, metrics: dict[str, Any], files: list[Path], plot: Path | None) -> None:
        if plot is not None and plot.is_file():
            self.run.log({"training_plot": self.wandb.Image(str(plot))})

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], out: Path, config: dict[str, Any], tensorboard_dir: str) -> list[Tracker]:
    """The trackers ``names`` asks for, opened for the run in ``out`` (their packages checked by ``check_installed``).

    Args:
        names: tracker names (``requested``).
        out: the run folder.
        config: the run's settings, recorded once.
        tensorboard_dir: the event files' folder inside ``out``.
    """
    quiet_third_party()
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out, tensorboard_dir))
        elif name == "mlflow":
            trackers.append(MlflowTracker(out, config))
        else:
            trackers.append(WandbTracker(out, config))
    return trackers
