"""LoRA as a registry method: ``lorakit.inject`` on ``targets``, saved in PEFT's adapter layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import ConfigError
from lorakit.io.files import load_adapter, save_adapter
from lorakit.lora.adapters import inject
from lorakit.lora.config import DEFAULT_INIT, LoraConfig
from lorakit.methods.finetune import lora_head_names


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str = "q,v",
    dropout: float = 0.0,
    init: str = DEFAULT_INIT,
    use_rslora: bool = False,
    modules_to_save: Any = None,
    train_head: bool = True,
    train_pooler: bool = True,
    use_dora: bool = False,
    exclude: Any = None,
    layers: Any = None,
) -> None:
    """Inject LoRA; a (new) classifier head (and the pooler it reads) trains in full and is saved with it.

    Args:
        model: a fresh transformers model.
        r / alpha / targets / dropout / init / use_rslora / use_dora: as in ``LoraConfig``.
        exclude: patterns removed from the targeted modules (``LoraConfig.exclude``); None: none.
        layers: block indices to adapt (``LoraConfig.layers``); None: every block.
        modules_to_save: modules trained in full and saved with the adapter; None: the classifier head
            (``lora_head_names``) when ``train_head``.
        train_head: with ``modules_to_save=None``, whether the classifier head trains.
        train_pooler: with ``modules_to_save=None``, whether the pretrained pooler the head reads trains too.
    """
    if modules_to_save is None:
        modules_to_save = lora_head_names(model, train_pooler) if train_head else ()
    if isinstance(modules_to_save, str):
        modules_to_save = [m.strip() for m in modules_to_save.split(",") if m.strip()]
    config = LoraConfig(
        r=r,
        alpha=alpha,
        targets=tuple(targets) if isinstance(targets, (list, tuple)) else targets,
        dropout=dropout,
        init=init,  # type: ignore[arg-type]
        use_rslora=use_rslora,
        modules_to_save=tuple(modules_to_save),
        use_dora=use_dora,
        exclude=() if exclude is None else exclude,
        layers=None if layers is None else tuple(layers),
    )
    inject(model, config)


def lora_options(cfg: Any) -> dict[str, Any]:
    """A training config's LoRA settings (its own fields: ``--r``, ``--alpha``, ``--targets`` ...)."""
    if getattr(cfg, "method_options", None):
        raise ConfigError(
            f"method 'lora' takes no method_options ({cfg.method_options}): "
            "set r, alpha, targets, dropout, init, use_rslora, use_dora, exclude, layers and modules_to_save directly"
        )
    return {
        "r": cfg.r,
        "alpha": cfg.alpha,
        "targets": tuple(cfg.targets),
        "dropout": cfg.dropout,
        "init": cfg.init or DEFAULT_INIT,  # None: a config not resolved by resolve_task_defaults
        "use_rslora": cfg.use_rslora,
        "modules_to_save": None if cfg.modules_to_save is None else tuple(cfg.modules_to_save),
        "train_pooler": cfg.train_pooler is not False,
        "use_dora": cfg.use_dora,
        "exclude": tuple(cfg.exclude),
        "layers": None if cfg.layers is None else tuple(cfg.layers),
    }


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """The active adapter, in PEFT's layout (``lorakit.save_adapter``)."""
    return save_adapter(model, path)


def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """An adapter directory (lorakit's or PEFT's) into a fresh base model (``lorakit.load_adapter``)."""
    return load_adapter(model, path)
