"""Training and evaluation: `lorakit train` / `lorakit eval` and their Python API."""

from lorakit.training.config import TrainConfig, resolve_config
from lorakit.training.outputs import load_trained, save_trained
from lorakit.training.prepare import prepare_model
from lorakit.training.trainer import train

__all__ = [
    "TrainConfig",
    "load_trained",
    "prepare_model",
    "resolve_config",
    "save_trained",
    "train",
]
