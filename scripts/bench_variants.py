"""Training-step time of DoRA against plain LoRA, lorakit and PEFT side by side, in one run.

Each configuration trains the same model on the same batches (forward, backward, AdamW step); the
configurations take turns step by step, so a machine that gets busier slows all of them alike. Prints the
median step time of each and its ratio to lorakit plain LoRA.

    PYTHONPATH=src python scripts/bench_variants.py --model smollm2-135m --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def _lorakit(model: nn.Module, r: int, use_dora: bool) -> nn.Module:
    from lorakit import LoraConfig, inject

    return inject(model, LoraConfig(r=r, alpha=2 * r, targets=("q", "k", "v", "o"), use_dora=use_dora))


def _peft(model: nn.Module, r: int, use_dora: bool) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             use_dora=use_dora, task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(model, config)


def _step_fn(model: nn.Module, batch: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    """Run the comparison and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    from lorakit.models import load_model

    torch.manual_seed(0)
    configs = {
        "lorakit LoRA": (_lorakit, False),
        "lorakit DoRA": (_lorakit, True),
        "PEFT LoRA": (_peft, False),
        "PEFT DoRA": (_peft, True),
    }
    steps = {}
    vocab = None
    for name, (build, dora) in configs.items():
        model, _ = load_model(args.model)
        vocab = vocab or model.config.vocab_size
        batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        steps[name] = _step_fn(build(model.train(), args.r, dora), batch)
        steps[name]()  # warm-up: allocations, first-call overheads
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step())
    base = statistics.median(times["lorakit LoRA"])
    print(f"{args.model}, q/k/v/o r={args.r}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<14} {median * 1000:8.1f} ms/step   {median / base:5.2f}x lorakit LoRA")


if __name__ == "__main__":
    main()
