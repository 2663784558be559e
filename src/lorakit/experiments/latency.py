"""`lorakit latency`: forward latency of each method against the base model (the paper's Table 1 analogue).

Every variant is built from one loaded base model (deep copies), so the weights are identical. Shapes are
measured one at a time; within a shape the variants take turns, repeat by repeat (``lorakit.bench.timing``),
so background load on a shared machine hits all of them alike. The reported number is the median over
repeats after warm-up.
By default only the last position's logits are computed (as in a generation prefill): the LM head costs
the same for every variant and would otherwise dominate memory at batch 16 x 512 on a large vocabulary.
"""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.bench.timing import time_alternating
from lorakit.errors import ConfigError

# base_copy, a second copy of the base, computes exactly what base computes: its % is the noise floor.
DEFAULT_VARIANTS = ("base", "base_copy", "lora_merged", "lora_unmerged", "adapter_h", "adapter_l", "prefix_layer")
RANDOM_MODELS = {
    # name → GPT2Config kwargs: random weights, no download, for quick or offline runs
    "gpt2-small-random": {},
    "gpt2-tiny-random": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1024},
}


def load_base(name: str, device: str) -> nn.Module:
    """A causal LM in eval mode: a random GPT-2 by name, else anything ``lorakit.io.models.load_model`` loads."""
    if name in RANDOM_MODELS:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**RANDOM_MODELS[name]))
    else:
        from lorakit.io.models import load_model

        model, _ = load_model(name, "causal-lm")
    return model.to(device).eval()


@torch.no_grad()
def _randomize(model: nn.Module, std: float = 0.01) -> None:
    """Trained-looking values for the added parameters: a merged all-zero LoRA would not even change a weight.

    Seeded, so merged and unmerged LoRA carry the same adapter.
    """
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_variant(
    base: nn.Module, variant: str, *, r: int, targets: str, bottleneck: int, prefix: int
) -> nn.Module:
    """A deep copy of ``base`` carrying ``variant`` (any method name, or lora_merged / lora_unmerged)."""
    from lorakit import LoraConfig, inject, merge
    from lorakit.methods import METHODS, apply_method

    model = copy.deepcopy(base)
    if variant in ("base", "base_copy"):
        return model
    if variant in ("lora_merged", "lora_unmerged"):
        inject(model, LoraConfig(r=r, alpha=2 * r, targets=targets))
        _randomize(model)
        if variant == "lora_merged":
            merge(model)
        return model
    if variant not in METHODS:
        known = ", ".join(["base", "base_copy", "lora_merged", "lora_unmerged", *METHODS])
        raise ConfigError(f"unknown latency variant {variant!r}; known: {known}")
    options: dict[str, Any] = {}
    if variant.startswith("adapter_"):
        options["bottleneck"] = bottleneck
    elif variant == "prefix_layer":
        options.update(length=prefix, init="normal")
    elif variant == "prefix_embed":
        options.update(lp=prefix, li=0, init="normal")
    elif variant == "lora":
        options.update(r=r, targets=targets)
    apply_method(model, variant, **options)
    _randomize(model)
    return model


def _forward(model: nn.Module, ids: torch.Tensor, full_logits: bool) -> Callable[[], Any]:
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if not full_logits:
        kwargs["logits_to_keep"] = 1
    return lambda: model(**kwargs)


@torch.inference_mode()
def measure(
    models: dict[str, nn.Module],
    batch: int,
    seq: int,
    *,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    full_logits: bool = False,
    vocab: int | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per forward for each model on one (batch, seq) input, variants interleaved."""
    first = next(iter(models.values()))
    vocab = vocab or int(first.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(batch * 100_003 + seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    calls = {name: _forward(m, ids, full_logits) for name, m in models.items()}
    seconds = time_alternating(calls, warmup, repeats, device, record_cpu=False)
    return {name: [1000.0 * t for t in times] for name, times in seconds.items()}


def run_latency(
    model_name: str = "smollm2-135m",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    batch_sizes: Sequence[int] = (1, 4, 16),
    seq_lens: Sequence[int] = (128, 512),
    *,
    repeats: int = 5,
    warmup: int = 2,
    r: int = 8,
    targets: str = "q,v",
    bottleneck: int = 16,
    prefix: int = 10,
    device: str = "cpu",
    full_logits: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every variant on every shape; returns a JSON-able report (see ``format_table``).

    Args:
        model_name: the built-in base model.
        variants: the methods measured beside the base model (always measured first).
        batch_sizes, seq_lens: the input shapes, every combination.
        repeats, warmup: timed and untimed forward passes of each variant per shape.
        r, targets: LoRA's rank and target matrices.
        bottleneck: the Adapter baseline's width.
        prefix: the prefix-tuning baselines' virtual tokens.
        device: where the models run.
        full_logits: compute every position's logits (default: the last one's).
        log: receives a progress line per shape.
    """
    variants = ("base", *[v for v in variants if v != "base"])  # the reference, measured first
    if repeats < 1 or warmup < 0:
        raise ConfigError("repeats must be >= 1 and warmup >= 0")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    base = load_base(model_name, device)
    settings = {"r": r, "targets": targets, "bottleneck": bottleneck, "prefix": prefix}
    models = {v: build_variant(base, v, **settings) for v in variants}
    rows = []
    for batch in batch_sizes:
        for seq in seq_lens:
            if log:
                log(f"latency: batch {batch}, seq {seq} ...")
            times = measure(models, batch, seq, warmup=warmup, repeats=repeats, device=device,
                            full_logits=full_logits)
            rows += _shape_rows(times, batch, seq)
    return {
        "model": model_name,
        "device": device,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "full_logits": full_logits,
        "settings": {"lora_r": r, "lora_targets": targets, "bottleneck": bottleneck, "prefix_length": prefix},
        "trainable_params": {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "variants": list(variants),
        "rows": rows,
    }


def _shape_rows(times: dict[str, list[float]], batch: int, seq: int) -> list[dict[str, Any]]:
    """One row per variant of one shape: its median ms and its overhead over the base model's median."""
    base_ms = statistics.median(times["base"])
    rows = []
    for variant, all_ms in times.items():
        ms = statistics.median(all_ms)
        rows.append({"variant": variant, "batch": batch, "seq": seq, "ms": ms,
                     "pct_over_base": 100.0 * (ms / base_ms - 1.0), "all_ms": all_ms})
    return rows


def format_table(report: dict[str, Any], stat: str = "median") -> str:
    """Markdown: one row per (batch, seq), base in ms, every other variant as ms (+% over base).

    ``stat="min"`` shows the fastest repeat instead of the median: on a machine shared with other jobs it
    is the estimate least disturbed by them.
    """
    if stat not in ("median", "min"):
        raise ConfigError(f"stat must be 'median' or 'min', got {stat!r}")
    variants = ["base", *[v for v in report["variants"] if v != "base"]]
    head = "| batch | seq | " + " | ".join(f"{v} (ms)" if v == "base" else v for v in variants) + " |"
    lines = [head, "|" + "---:|" * (2 + len(variants))]
    cells: dict[tuple[int, int], dict[str, float]] = {}
    for row in report["rows"]:
        ms = min(row["all_ms"]) if stat == "min" else row["ms"]
        cells.setdefault((row["batch"], row["seq"]), {})[row["variant"]] = ms
    for (batch, seq), by_variant in cells.items():
        base = by_variant["base"]
        parts = [f"{base:.1f}"]
        for v in variants[1:]:
            parts.append(f"{by_variant[v]:.1f} ({100 * (by_variant[v] / base - 1):+.1f}%)")
        lines.append(f"| {batch} | {seq} | " + " | ".join(parts) + " |")
    return "\n".join(lines)
