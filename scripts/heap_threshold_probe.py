"""Peak RSS and step time of NF4 + LoRA training on SmolLM2-135M under one glibc heap setting.

    for m in default trim thr256 thr1024 thr4096; do python scripts/heap_threshold_probe.py $m; done

``default``: glibc as it comes; ``trim``: ``malloc_trim(0)`` after every step; ``thrN``: mmap threshold
N KiB (what ``lorakit.quant.heap.return_freed_memory_promptly`` sets, at 256). One setting per process, since
mallopt cannot be undone; 8 steps of 4 x 64 random tokens with gradient checkpointing, 2 threads.
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def main(mode: str) -> None:
    from lorakit.quant.heap import set_mmap_threshold, trim_heap

    if mode.startswith("thr"):
        set_mmap_threshold(int(mode[3:]) * 1024)
    from lorakit import LoraConfig, inject
    from lorakit.io.models import enable_activation_checkpointing
    from lorakit.lora.kernels import causal_lm_loss
    from lorakit.quant.load import load_quantized

    torch.set_num_threads(2)
    model, _, _ = load_quantized("smollm2-135m", "nf4")
    inject(model, LoraConfig(r=8, alpha=16, targets=("q", "k", "v", "o", "ffn"), init="kaiming"))
    enable_activation_checkpointing(model)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(8):
        ids = torch.randint(0, 49000, (4, 64), generator=gen)
        labels = ids.clone()
        labels[:, :20] = -100
        start = time.perf_counter()
        causal_lm_loss(model, ids, torch.ones_like(ids), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode == "trim":
            trim_heap()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = sorted(times[2:])[3]  # the upper median of steps 3-8 (the first two allocate everything once)
    print(f"{mode}: peak RSS {peak:.0f} MiB, step median {step:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "default")
