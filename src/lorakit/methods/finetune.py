"""Full fine-tuning, FTTop2 and head-only training, plus the architecture helpers every method shares.

The helpers find a model's transformer blocks and task head by structure (a ``ModuleList`` of
``num_hidden_layers`` blocks; a ``classifier``/``score`` child of a ``*For*Classification`` model), so the
methods work on Llama-, BERT- and GPT-2-style models without per-model code paths.
"""

from __future__ import annotations

from torch import nn

from lorakit.errors import ConfigError
from lorakit.lora.arch import POOLER_NAME
from lorakit.lora.arch import TASK_HEAD_NAMES as HEAD_NAMES  # one list of task-head names, in lorakit.lora.arch


def num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        raise ConfigError(f"{type(model).__name__} has no config.num_hidden_layers; cannot locate its blocks")
    return int(n)


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not d:
        raise ConfigError(f"{type(model).__name__} has no config.hidden_size")
    return int(d)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks in order, as (qualified name, block)."""
    n = num_layers(model)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        found = [name for name, _ in lists]
        raise ConfigError(
            f"expected exactly one ModuleList of {n} transformer blocks in {type(model).__name__}, "
            f"found {found}"
        )
    prefix, blocks = lists[0]
    return [(f"{prefix}.{i}", block) for i, block in enumerate(blocks)]


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The task head of a classification / QA model (new weights every method must train); [] for LMs.

    A causal LM's ``lm_head`` is not a task head: it is pretrained and usually tied to the input embedding.
    """
    kind = type(model).__name__
    if "For" not in kind or kind.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForPreTraining")):
        return []
    return [(name, m) for name, m in model.named_children() if name in HEAD_NAMES]


def classifier_head_names(model: nn.Module) -> list[str]:
    """Top-level head modules of a sequence classifier: ``classifier`` (BERT family), ``score`` (Llama …)."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def lora_head_names(model: nn.Module, include_pooler: bool = True) -> list[str]:
    """What LoRA trains in full for a sequence classifier: the new head and, where the head reads a
    pretrained pooler (BERT family), that pooler too. all-MiniLM-L6-v2's pooler (never trained by its
    sentence-embedding objective) outputs |x| ~ 0.05, so a head on it barely moves in a short run:
    SST-2, 64 steps, 57 % frozen vs 74 % trained (docs/records/training-defaults.md).

    Args:
        model: a sequence classifier (anything else: no heads).
        include_pooler: whether the pretrained pooler is included (``TrainConfig.train_pooler``).
    """
    heads = classifier_head_names(model)
    prefix = getattr(model, "base_model_prefix", "")
    pooler = getattr(getattr(model, prefix, None), POOLER_NAME, None)
    if heads and include_pooler and isinstance(pooler, nn.Module):
        heads.append(f"{prefix}.{POOLER_NAME}")
    return heads


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)


def unfreeze_head(model: nn.Module, train_head: bool) -> None:
    if train_head:
        for _, head in head_modules(model):
            unfreeze(head)


# -- the methods ---------------------------------------------------------------------------------------


def apply_full(model: nn.Module) -> None:
    """Full fine-tuning: every parameter trains (tied weights count once)."""
    unfreeze(model)


def apply_fttop(model: nn.Module, layers: int = 2, train_head: bool = True) -> None:
    """FTTop-k (the paper's FTTop2): only the last ``layers`` transformer blocks (and the task head) train."""
    blocks = transformer_blocks(model)
    if not isinstance(layers, int) or not 1 <= layers <= len(blocks):
        raise ConfigError(f"fttop2: layers must be an integer in [1, {len(blocks)}], got {layers!r}")
    freeze_all(model)
    for _, block in blocks[-layers:]:
        unfreeze(block)
    unfreeze_head(model, train_head)


def apply_head(model: nn.Module, heads: str = "") -> None:
    """Only the classifier head trains (the frozen-features baseline).

    Args:
        model: a sequence classifier.
        heads: comma-separated module names to train instead of the classifier head found by name.
    """
    names = [h.strip() for h in heads.split(",") if h.strip()] or classifier_head_names(model)
    if not names:
        raise ConfigError(f"method 'head' trains a classifier head, but {type(model).__name__} has none")
    freeze_all(model)
    for name in names:
        unfreeze(model.get_submodule(name))
