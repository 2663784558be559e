"""What a bench case measures, built: models, batches, adapters (lorakit's and PEFT's), train steps, and the
summaries of timed repeats. The case kinds in ``lorakit.bench.measure`` put these together.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.bench.suites import Case
from lorakit.bench.timing import CPU_TIMES
from lorakit.data.collate import IGNORE_INDEX
from lorakit.lora.arch import Family, family, family_of
from lorakit.lora.kinds import adapter_param_names


# -- models and data -------------------------------------------------------------------------------------
def build_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None). GPT-2 configs are randomly initialised (seed 0): timing needs no
    trained weights."""
    m = re.fullmatch(r"gpt2-(?:124m|L(\d+)-D(\d+))", name)
    if m:
        from transformers import GPT2Config, GPT2LMHeadModel

        layers, width = (int(m.group(1)), int(m.group(2))) if m.group(1) else (12, 768)
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64))
        return GPT2LMHeadModel(cfg).to(dtype), None
    from lorakit.io.models import load_model

    model, tokenizer = load_model(name, dtype=dtype)
    # safetensors weights may still be mmap-backed file pages that only become resident when first
    # touched (inside the measured steps); own copies make the loaded baseline hold every weight.
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.data = t.data.clone()
    return model, tokenizer


def e2e_file() -> Path | None:
    env = os.environ.get("LORAKIT_BENCH_E2E")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[3]
    candidates += [repo.parent / "shared" / "data" / "e2e" / name for name in ("train.txt", "valid.txt")]
    return next((p for p in candidates if p.is_file()), None)


def make_batches(case: Case, tokenizer: Any, vocab: int, count: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct batches of batch x seq tokens; labels only on E2E references (prompts -100),
    packed without padding.

    With the E2E data and a tokenizer the tokens are real; otherwise random ids take the label layout of
    E2E (about 54% prompt tokens), so the labelled fraction is alike for every model.
    """
    gen = torch.Generator().manual_seed(0)
    n = case.batch * case.seq
    ids = torch.randint(3, vocab, (n * count,), generator=gen)
    labels = ids.clone()
    path = e2e_file()
    segments: list[tuple[list[int] | None, list[int] | None, int, int]] = []
    if path is not None and tokenizer is not None:
        from lorakit.data.collate import encode_e2e_for_training
        from lorakit.data.e2e import load_e2e

        enc = encode_e2e_for_training(load_e2e(path)[: 80 * count], tokenizer, 128)
        for x, y in zip(enc["input_ids"], enc["labels"]):
            prompt = sum(1 for v in y if v == IGNORE_INDEX)
            segments.append((x, y, prompt, len(x) - prompt))
    else:
        # Mean E2E prompt / reference lengths under SmolLM2's tokenizer (34 / 29), shrunk to fit short rows.
        length = min(63, case.seq)
        segments = [(None, None, round(length * 34 / 63), length - round(length * 34 / 63))]
    pos = 0
    for x, y, prompt, target in itertools.cycle(segments):
        if pos >= n * count:
            break
        take = min(prompt + target, n * count - pos)
        if x is not None and y is not None:
            ys = torch.tensor(y[:take])
            ids[pos : pos + take] = torch.tensor(x[:take]) % vocab
            labels[pos : pos + take] = torch.where(ys == IGNORE_INDEX, IGNORE_INDEX, ys % vocab)
        else:
            labels[pos : pos + min(prompt, take)] = IGNORE_INDEX
        pos += take
    shape = (count, case.batch, case.seq)
    ids, labels = ids.view(shape), labels.view(shape)
    mask = torch.ones(case.batch, case.seq, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(count)]


def make_batch(case: Case, tokenizer: Any, vocab: int) -> dict[str, torch.Tensor]:
    return make_batches(case, tokenizer, vocab)[0]


def shared_copy(model: nn.Module) -> nn.Module:
    """A second module tree using the very same parameter and buffer tensors (no extra weight memory)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _family(model: nn.Module) -> Family:
    return family_of(model) or family("llama")


def apply_method(model: nn.Module, method: str, r: int, targets: tuple[str, ...], name: str = "default") -> nn.Module:
    """Make ``model`` trainable by ``method``; returns the module to call (PEFT wraps the model)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if method == "lorakit":
        from lorakit import LoraConfig, inject

        return inject(model, LoraConfig(r=r, alpha=2 * r, targets=targets), name)
    if method == "peft":
        return peft_add(model, r, targets, name)
    raise ValueError(f"unknown method {method!r}")


def _peft_config(model: nn.Module, r: int, targets: tuple[str, ...]) -> Any:
    import peft

    fam = _family(model)
    modules = fam.peft_modules(targets)  # PEFT adapts a fused projection (GPT-2's c_attn) whole
    return peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=modules,
        fan_in_fan_out=fam.transposed_weights,
        task_type="CAUSAL_LM",
    )


def peft_add(model: nn.Module, r: int, targets: tuple[str, ...], name: str = "default") -> nn.Module:
    """get_peft_model for the first adapter, add_adapter after (``model`` may already be a PeftModel)."""
    import peft

    if isinstance(model, peft.PeftModel):
        model.add_adapter(name, _peft_config(model.get_base_model(), r, targets))
        return model
    return peft.get_peft_model(model, _peft_config(model, r, targets), adapter_name=name)


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA weights (B starts at 0), so merges and mixed batches do real work."""
    gen = torch.Generator().manual_seed(seed)
    lorakit_state = adapter_param_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name in lorakit_state:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


# -- timing: lorakit.bench.timing (shared with `lorakit latency`) -----------------------------------------
def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of per-round ratios a_i / b_i: robust to load that changes between rounds."""
    return statistics.median(x / y for x, y in zip(a, b))


def ratio_stats(times: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """a / b three ways: paired wall-time ratio, ratio of the fastest runs, paired CPU-time ratio."""
    out = {"paired": paired_ratio(times[a], times[b]), "of_min": min(times[a]) / min(times[b])}
    if a in CPU_TIMES and b in CPU_TIMES:
        out["cpu_paired"] = paired_ratio(CPU_TIMES[a], CPU_TIMES[b])
    return out


# -- precision and steps ---------------------------------------------------------------------------------
def autocast_ctx(precision: str, device: str) -> contextlib.AbstractContextManager:
    if precision == "bf16-autocast":
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel wrapper (for lorakit.lora.kernels.causal_lm_loss)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def make_train_step(
    model: nn.Module,
    batches: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    precision: str,
    loss: str,
    device: str,
    lr: float = 1e-4,
    compile: bool = False,
) -> Callable[[], float]:
    """forward + backward + AdamW over the trainable parameters; returns the loss. Cycles through
    ``batches`` when given a list. ``compile``: compile the backbone as ``lorakit train --compile`` does
    and take one step here, so that the compilation is neither timed nor in the step memory."""
    from lorakit.lora.kernels import causal_lm_loss, compile_for_training

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    feed = itertools.cycle(batches if isinstance(batches, list) else [batches])

    def step() -> float:
        batch = next(feed)
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(precision, device):
            if loss == "labels":
                value = causal_lm_loss(inner_model(model), batch["input_ids"], batch["attention_mask"], batch["labels"])
            else:
                value = model(**batch).loss
        value.backward()
        opt.step()
        return float(value.detach())

    if compile:
        compile_for_training(inner_model(model))
        step()
    return step
