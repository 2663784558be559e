"""Model-side work the engine runs between steps: hot-loading an adapter and classifying texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.io.files import load_adapter, read_adapter
from lorakit.lora.adapters import configs, route_rows
from lorakit.serve.names import adapter_name_problem
from lorakit.serve.protocol import APIError


def check_servable(path: str | Path, task: str, need_heads: tuple[str, ...] = ()) -> None:
    """Refuse adapter files a shared server cannot route per row (raises ``APIError`` 400).

    Args:
        path: the adapter directory.
        task: the server's task ("causal-lm" or "seq-cls").
        need_heads: modules the file must carry its own copy of (the base's untrained classifier head).
    """
    try:
        parsed = read_adapter(path)
    except LorakitError as exc:
        raise APIError(400, str(exc), param="path") from exc
    missing = [m for m in need_heads if m not in parsed.saved_modules]
    if missing:
        raise APIError(400, f"{path}: this adapter carries no trained {', '.join(missing)} (modules_to_save), and "
                       "the base model's is untrained (random): its answers would mean nothing", param="path")
    if parsed.biases:
        # bias="all"/"lora_only" files overwrite the base model's biases, which every row shares.
        raise APIError(400, f"{path}: this adapter trains biases of the base model ({len(parsed.biases)} tensors); "
                       "a server shares one base among all adapters, so it cannot serve it (merge it instead)",
                       param="path")
    file_task = parsed.raw_config.get("task_type")
    if file_task == "SEQ_CLS" and task != "seq-cls":
        raise APIError(400, f"{path} is a sequence-classification adapter; this server serves {task}", param="path")


def load(model: nn.Module, name: str, path: str, task: str, need_heads: tuple[str, ...] = ()) -> None:
    """Load adapter ``name`` from ``path`` without activating it; the model is unchanged on any error.

    Args:
        model: the served model.
        name: the new adapter's model id.
        path: its directory.
        task: the server's task.
        need_heads: modules the file must carry (see ``check_servable``).
    """
    problem = adapter_name_problem(name)
    if problem:
        raise APIError(400, problem, param="name")
    if name in configs(model):
        raise APIError(409, f"adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first",
                       code="adapter_exists", param="name")
    check_servable(path, task, need_heads)
    try:
        load_adapter(model, path, name, activate=False)
    except LorakitError as exc:  # the loader's own message: mismatched shapes, missing modules, ...
        raise APIError(400, str(exc), param="path") from exc


def classify(model: nn.Module, tokenizer: Any, texts: list[str], adapters: list[str | None],
             max_len: int) -> tuple[list[dict[str, Any]], int]:
    """One routed forward pass: row i through ``adapters[i]``. Returns per-row results and prompt tokens.

    Args:
        model: a sequence classifier.
        tokenizer: its tokenizer.
        texts: the inputs.
        adapters: one adapter (None: the base) per input.
        max_len: inputs are truncated to this many tokens.
    """
    missing = sorted({a for a in adapters if a is not None and a not in configs(model)})
    if missing:
        raise APIError(404, f"adapter(s) {missing} are not loaded", code="model_not_found", param="model")
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    with torch.no_grad(), route_rows(model, adapters):
        logits = model(**batch).logits.float()
    probs = torch.softmax(logits, dim=-1)
    labels = getattr(model.config, "id2label", None) or {}
    rows = []
    for p in probs:
        k = int(torch.argmax(p))
        rows.append({"label": labels.get(k, str(k)), "label_id": k, "scores": [round(float(x), 6) for x in p]})
    return rows, int(batch["attention_mask"].sum())
