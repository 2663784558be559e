"""lorakit: Low-Rank Adaptation for Hugging Face transformers. The public API, re-exported."""

from lorakit.arith.combine import combine_adapters
from lorakit.errors import AdapterFileError, ConfigError, LorakitError, MergeError, TargetError
from lorakit.generation import generate
from lorakit.io.files import load_adapter, read_adapter, save_adapter
from lorakit.lora.adapters import (
    active_adapter,
    delete_adapter,
    disabled,
    inject,
    merge,
    merge_and_unload,
    parameter_report,
    route_rows,
    set_adapter,
    unmerge,
)
from lorakit.lora.config import LoraConfig
from lorakit.version import __version__

__all__ = [
    "AdapterFileError",
    "ConfigError",
    "LoraConfig",
    "LorakitError",
    "MergeError",
    "TargetError",
    "__version__",
    "active_adapter",
    "combine_adapters",
    "delete_adapter",
    "disabled",
    "generate",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "parameter_report",
    "read_adapter",
    "route_rows",
    "save_adapter",
    "set_adapter",
    "unmerge",
]
