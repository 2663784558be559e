"""The bench case kinds (one function per kind) and the memory they record; ``lorakit.bench.child`` runs one
case in a subprocess, with models and steps from ``lorakit.bench.build``.

Memory: ``peak_rss_mb`` is this process's ru_maxrss (loading included); ``delta_rss_mb`` is the peak during
the measured steps over the resident size once the model was loaded and set up (the high-water mark is
reset through /proc/self/clear_refs where Linux allows, so a transient peak while loading does not hide
it). On CUDA, ``cuda_peak_mb`` is torch's max_memory_allocated over the measured steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import re
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.bench.build import (
    apply_method,
    autocast_ctx,
    build_model,
    make_batch,
    make_batches,
    make_train_step,
    randomize_adapters,
    ratio_stats,
    shared_copy,
    summary,
)
from lorakit.bench.suites import Case
from lorakit.bench.timing import time_alternating, time_one
from lorakit.data.collate import IGNORE_INDEX


# -- memory ----------------------------------------------------------------------------------------------
def maxrss_mb() -> float:
    """ru_maxrss of this process in MiB (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024


def _status_mb(field_name: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def rss_mb() -> float:
    """Current resident set size in MiB (falls back to the peak where /proc is missing)."""
    value = _status_mb("VmRSS")
    return value if value is not None else maxrss_mb()


def settle_memory() -> None:
    """Return freed heap to the OS, so the baseline RSS is what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- case kinds ------------------------------------------------------------------------------------------
class Measure:
    """Baseline memory after set-up, then the peak over the measured block."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.result: dict[str, Any] = {}

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        settle_memory()
        self.result["load_peak_rss_mb"] = maxrss_mb()
        self.result["rss_loaded_mb"] = rss_mb()
        self.result["peak_reset"] = reset_peak()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.result["cuda_loaded_mb"] = torch.cuda.memory_allocated() / 2**20
        yield
        run_peak = _status_mb("VmHWM") if self.result["peak_reset"] else None
        self.result["peak_rss_mb"] = max(maxrss_mb(), self.result["load_peak_rss_mb"])
        self.result["run_peak_rss_mb"] = run_peak if run_peak is not None else maxrss_mb()
        self.result["delta_rss_mb"] = self.result["run_peak_rss_mb"] - self.result["rss_loaded_mb"]
        if self.device.startswith("cuda"):
            self.result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            self.result["cuda_delta_mb"] = self.result["cuda_peak_mb"] - self.result["cuda_loaded_mb"]


def _base_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-base" else torch.float32


def run_train(case: Case, measure: Measure) -> dict[str, Any]:
    model, tok = build_model(case.model, _base_dtype(case.precision))
    model = apply_method(model.to(case.device), case.method, case.r, case.targets)
    batch = {k: v.to(case.device) for k, v in make_batch(case, tok, model.config.vocab_size).items()}
    step = make_train_step(model, batch, case.precision, case.loss, case.device, compile=case.compile)
    out: dict[str, Any] = {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "labelled_fraction": float((batch["labels"][:, 1:] != IGNORE_INDEX).float().mean()),
    }
    with measure.block():
        times = time_alternating({"step": step}, case.warmup, case.repeats, case.device)["step"]
    out.update(summary(times), times=times)
    return out


def run_pair(case: Case, measure: Measure) -> dict[str, Any]:
    """Two trainers on one set of frozen weights, stepped alternately; ratio = lorakit / other."""
    other = case.other
    precisions = {case.precision, other["precision"]}
    if "bf16-base" in precisions and len(precisions) > 1:
        raise ValueError("a pair shares frozen weights, so both sides need the same base dtype")
    base, tok = build_model(case.model, _base_dtype(case.precision))
    base = base.to(case.device)
    mine = apply_method(shared_copy(base), case.method, case.r, case.targets)
    theirs = apply_method(base, other["method"], case.r, case.targets)
    batch = {k: v.to(case.device) for k, v in make_batch(case, tok, base.config.vocab_size).items()}
    steps = {
        "mine": make_train_step(mine, batch, case.precision, case.loss, case.device, compile=case.compile),
        "other": make_train_step(theirs, batch, other["precision"], other["loss"], case.device),
    }
    with measure.block():
        times = time_alternating(steps, case.warmup, case.repeats, case.device)
    stats = ratio_stats(times, "mine", "other")
    return {
        "mine": summary(times["mine"]),
        "other": summary(times["other"]),
        "times": times,
        "ratio": stats["paired"],
        "ratio_stats": stats,
        **summary(times["mine"]),
    }


def run_infer(case: Case, measure: Measure) -> dict[str, Any]:
    """Forward of the variant, interleaved with the plain model (same weight tensors) for the overhead."""
    from lorakit import merge

    base, _ = build_model(case.model, _base_dtype(case.precision))
    base = base.to(case.device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    variant = base if case.method == "base" else apply_method(shared_copy(base), case.method, case.r, case.targets)
    variant.eval()
    randomize_adapters(variant)
    if case.mode == "merged":
        if case.method == "lorakit":
            merge(variant)
        elif case.method == "peft":
            variant.merge_adapter()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (case.batch, case.seq), generator=gen).to(case.device)
    mask = torch.ones_like(ids)

    def forward(m: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), autocast_ctx(case.precision, case.device):
                return m(input_ids=ids, attention_mask=mask, use_cache=False).logits

        return run

    with measure.block():
        times = time_alternating(
            {"variant": forward(variant), "base": forward(base)}, case.warmup, case.repeats, case.device
        )
    stats = ratio_stats(times, "variant", "base")
    return {
        **summary(times["variant"]),
        "times": times,
        "base": summary(times["base"]),
        "overhead": stats["paired"] - 1.0,
        "ratio_stats": stats,
    }


def run_mixed(case: Case, measure: Measure) -> dict[str, Any]:
    """n adapters, each row of the batch on adapter i % n; vs all rows on one adapter; vs the plain model.

    Args:
        case: the bench case (model, method, adapters, batch shape, repeats).
        measure: the resource probe around the timed block.
    """
    base, _ = build_model(case.model, _base_dtype(case.precision))
    base = base.to(case.device).eval()
    names = [f"a{i}" for i in range(case.n_adapters)]
    model = _with_adapters(shared_copy(base), case, names)
    rows = [names[i % len(names)] for i in range(case.batch)]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (case.batch, case.seq), generator=gen).to(case.device)
    fns = _mixed_calls(case, model, base, ids, rows)
    with measure.block():
        times = time_alternating(fns, case.warmup, case.repeats, case.device)
    stats = {
        f"{a}_over_{b}": ratio_stats(times, a, b)
        for a, b in (("mixed", "single"), ("mixed", "base"), ("single", "base"))
    }
    return {
        **summary(times["mixed"]),
        "times": times,
        "single": summary(times["single"]),
        "base": summary(times["base"]),
        **{k: v["paired"] for k, v in stats.items()},
        "ratio_stats": stats,
    }


def _with_adapters(model: nn.Module, case: Case, names: list[str]) -> nn.Module:
    """``model`` with one random adapter per name (``case.method``'s kind), the first active, in eval mode."""
    from lorakit import set_adapter

    for name in names:
        model = apply_method(model, case.method, case.r, case.targets, name)
    model.eval()
    randomize_adapters(model)
    if case.method == "peft":
        model.set_adapter(names[0])
    else:
        set_adapter(model, names[0])
    return model


def _mixed_calls(case: Case, model: nn.Module, base: nn.Module, ids: Tensor,
                 rows: list[str]) -> dict[str, Callable[[], Any]]:
    """The three timed forwards: rows routed to their adapters, all rows on the active one, the plain base."""
    from lorakit import route_rows

    mask = torch.ones_like(ids)

    def run(m: nn.Module, **kw: Any) -> Callable[[], Any]:
        def go() -> Any:
            with torch.inference_mode(), autocast_ctx(case.precision, case.device):
                return m(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits

        return go

    def mixed_lorakit() -> Any:
        with route_rows(model, rows):
            return run(model)()

    return {
        "mixed": run(model, adapter_names=rows) if case.method == "peft" else mixed_lorakit,
        "single": run(model),
        "base": run(base),
    }


def run_merge(case: Case, measure: Measure) -> dict[str, Any]:
    """Merge then unmerge every adapted layer, timed separately."""
    from lorakit import merge, unmerge

    model, _ = build_model(case.model, _base_dtype(case.precision))
    model = apply_method(model.to(case.device), case.method, case.r, case.targets)
    randomize_adapters(model)
    if case.method == "peft":
        fns = {"merge": model.merge_adapter, "unmerge": model.unmerge_adapter}
        cycle = [("merge", "unmerge")]
    else:
        # merge() checks for non-finite values by default; check=False is PEFT's plain merge_adapter().
        fns = {
            "merge": lambda: merge(model),
            "unmerge": lambda: unmerge(model),
            "merge_unchecked": lambda: merge(model, check=False),
        }
        cycle = [("merge", "unmerge"), ("merge_unchecked", "unmerge")]
    times: dict[str, list[float]] = {name: [] for name in fns}
    with measure.block():
        for i in range(case.warmup + case.repeats):
            for pair in cycle:
                for name in pair:  # strictly alternating: a merge needs an unmerged model
                    t = time_one(fns[name], case.device)
                    if i >= case.warmup:
                        times[name].append(t)
    extra = {"merge_unchecked": summary(times["merge_unchecked"])} if "merge_unchecked" in times else {}
    return {**summary(times["merge"]), "times": times, "unmerge": summary(times["unmerge"]), **extra}


def run_switch(case: Case, measure: Measure) -> dict[str, Any]:
    """Load an adapter file as a new name and make it active; the delete after each is not timed."""
    from lorakit import delete_adapter, load_adapter, save_adapter, set_adapter

    model, _ = build_model(case.model, _base_dtype(case.precision))
    model = apply_method(model.to(case.device), case.method, case.r, case.targets)
    randomize_adapters(model)
    model.eval()
    tmp = tempfile.TemporaryDirectory(prefix="lorakit-bench-")
    path = Path(tmp.name) / "adapter"
    if case.method == "peft":
        model.save_pretrained(str(path))
        saved = path
    else:
        saved = save_adapter(model, path)
    counter = itertools.count()
    loaded: list[str] = []

    def load_and_switch() -> None:
        name = f"s{next(counter)}"
        if case.method == "peft":
            model.load_adapter(str(saved), adapter_name=name)
            model.set_adapter(name)
        else:
            load_adapter(model, saved, name)
            set_adapter(model, name)
        loaded.append(name)

    def drop() -> None:
        name = loaded.pop()
        if case.method == "peft":
            model.set_adapter("default")
            model.delete_adapter(name)
        else:
            set_adapter(model, "default")
            delete_adapter(model, name)

    times: list[float] = []
    with measure.block():
        for i in range(case.warmup + case.repeats):
            t = time_one(load_and_switch, case.device)
            drop()
            if i >= case.warmup:
                times.append(t)
    tmp.cleanup()
    return {**summary(times), "times": times}


def copy_peft_init(peft_model: nn.Module, lorakit_model: nn.Module) -> None:
    """Give lorakit's adapters PEFT's initial A (B is zero in both), so both runs start identically."""
    from lorakit.lora.adapters import lora_layers

    peft_modules = dict(peft_model.get_base_model().named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(lorakit_model):
            weights = layer.adapters["default"]
            if weights.slices is not None:
                raise ValueError("quality runs need whole-module adapters (PEFT cannot slice c_attn)")
            weights.A["whole"].copy_(peft_modules[name].lora_A["default"].weight)


def run_quality(case: Case, measure: Measure) -> dict[str, Any]:
    """Same start, same batches, ``repeats`` steps: lorakit (case precision, loss) vs ``other`` (PEFT).

    Reports the loss of every step for both and the fp32 loss of both on a held-out batch at the end.
    """
    other = case.other
    base, tok = build_model(case.model)
    base = base.to(case.device)
    mine = apply_method(shared_copy(base), case.method, case.r, case.targets)
    theirs = apply_method(base, other["method"], case.r, case.targets)
    copy_peft_init(theirs, mine)
    batches = [
        {k: v.to(case.device) for k, v in b.items()}
        for b in make_batches(case, tok, base.config.vocab_size, case.repeats + 1)
    ]
    held_out = batches.pop()
    step_mine = make_train_step(mine, batches, case.precision, case.loss, case.device, lr=1e-3)
    step_theirs = make_train_step(theirs, batches, other["precision"], other["loss"], case.device, lr=1e-3)
    with measure.block():
        losses = {"mine": [], "other": []}
        for _ in range(case.repeats):
            losses["mine"].append(step_mine())
            losses["other"].append(step_theirs())
    held: dict[str, float] = {}
    for key, model in (("mine", mine), ("other", theirs)):
        model.eval()
        with torch.no_grad():
            held[key] = float(model(**held_out).loss)
    tail = max(1, min(5, case.repeats))
    final = {k: statistics.mean(v[-tail:]) for k, v in losses.items()}
    return {
        "median_s": 0.0,
        "min_s": 0.0,
        "max_s": 0.0,
        "losses": losses,
        "final_train_loss": final,
        "held_out_loss": held,
        "final_rel_diff": final["mine"] / final["other"] - 1.0,
        "held_out_rel_diff": held["mine"] / held["other"] - 1.0,
        "start_loss": losses["other"][0],
    }
