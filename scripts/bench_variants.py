"""Training-step time of DoRA against plain LoRA, lorakit and PEFT side by side, in one run.

Each configuration trains the same model on the same batches (forward, backward, AdamW step); the
configurations take turns step by step, in a rotating order, so a machine that gets busier slows all of
them alike. Prints the
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


def _step_fn(model: nn.Module, batch: torch.Tensor) -> Callable[[], tuple[float, float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds): waiting for a busy core inflates only the first."""
        start, cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

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
    from lorakit.io.models import load_model

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
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    order = list(steps)
    for round_ in range(args.steps):
        # Rotate who goes first: no configuration always runs right after model loading or a cold cache.
        for name in order[round_ % len(order):] + order[: round_ % len(order)]:
            times[name].append(steps[name]())
    def med(name: str, i: int) -> float:
        return statistics.median(t[i] for t in times[name])

    print(f"{args.model}, q/k/v/o r={args.r}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; ratios to lorakit LoRA")
    for name in times:
        print(f"{name:<14} wall {med(name, 0) * 1000:8.1f} ms/step ({med(name, 0) / med('lorakit LoRA', 0):4.2f}x)"
              f"   CPU {med(name, 1) * 1000:8.1f} ms/step ({med(name, 1) / med('lorakit LoRA', 1):4.2f}x)")


if __name__ == "__main__":
    main()
