"""Training and evaluation: `lorakit train` / `lorakit eval` and their Python API."""

from lorakit.training.config import TrainConfig, resolve_config
from lorakit.training.trainer import (
    METHODS,
    load_trained,
    prepare_model,
    register_method,
    save_trainable_state,
    save_trained,
    train,
)

__all__ = [
    "METHODS",
    "TrainConfig",
    "load_trained",
    "prepare_model",
    "register_method",
    "resolve_config",
    "save_trainable_state",
    "save_trained",
    "train",
]
