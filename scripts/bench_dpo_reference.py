"""What the DPO reference pass costs within a step: its share of the step's time and its peak memory.

A step of ``--task dpo`` runs the reference (the same network, adapter off, ``no_grad``) and then the policy's
forward and backward pass, on one batch of 2B sequences (B chosen, B rejected). This times both parts on the
same real batches of E2E preference pairs (SmolLM2-135M, LoRA q,v r=8), interleaved in one process, and
measures each part's peak memory in a fresh child process (resident memory over the loaded model's).
A precomputed reference (``--precompute-ref``, as TRL's ``precompute_ref_log_probs``) would store two floats
per pair and skip the first part on every step after one pass over the data.

    python scripts/bench_dpo_reference.py --data /tmp/e2e-pref --batches 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lorakit import inject
from lorakit.data.preference import collate_preference, encode_preference, load_preference
from lorakit.io.models import load_model
from lorakit.lora.config import LoraConfig
from lorakit.training.preference import PreferenceLoss, preference_loss, reference_mode, sequence_logps

PAGE = os.sysconf("SC_PAGE_SIZE")


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """SmolLM2 with a LoRA whose B is not zero (a trained-looking policy) and the first batches of pairs."""
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", "causal-lm")
    inject(model, LoraConfig(r=8, alpha=16, targets=("q", "v")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "B" in name.split("."):
                p.normal_(std=0.01)
    rows = encode_preference(load_preference(args.data / "train.jsonl"), tok, 256)
    n = args.batch_size
    batches = [collate_preference(rows[i * n : (i + 1) * n], tok.pad_token_id) for i in range(args.batches)]
    model.train()
    return model, batches


def reference_part(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), reference_mode(model):
        logps, _ = sequence_logps(model, batch)
    return logps


def policy_part(model: torch.nn.Module, batch: dict[str, torch.Tensor], ref: torch.Tensor) -> None:
    half = batch["input_ids"].shape[0] // 2
    logps, counts = sequence_logps(model, batch)
    per_pair, _, _ = preference_loss(PreferenceLoss(), (logps[:half], logps[half:]), (ref[:half], ref[half:]),
                                     (counts[:half], counts[half:]))  # fmt: skip
    per_pair.mean().backward()
    model.zero_grad(set_to_none=True)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def peak_growth(args: argparse.Namespace, part: str) -> float:
    """In this (fresh) process: the peak resident memory over the loaded model, MiB, of running ``part`` alone
    over every batch after a warm-up pass (RSS sampled every millisecond; loading peaks higher, so ru_maxrss
    cannot tell)."""
    model, batches = setup(args)
    refs = [torch.zeros(b["input_ids"].shape[0]) for b in batches]  # the values do not change the cost
    run = (lambda i: reference_part(model, batches[i])) if part == "reference" else (
        lambda i: policy_part(model, batches[i], refs[i]))  # fmt: skip
    run(0)  # one-time allocations (thread pools, kernels' workspaces) are not the part's
    before, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for i in range(len(batches)):
        run(i)
    done.set()
    sampler.join()
    return peak[0] - before


def timings(args: argparse.Namespace) -> dict[str, float]:
    """Per batch, reference then policy (after one warm-up batch); the mean seconds of each part."""
    model, batches = setup(args)
    policy_part(model, batches[0], reference_part(model, batches[0]))  # warm-up
    ref_s, pol_s = [], []
    for batch in batches:
        t0 = time.perf_counter()
        ref = reference_part(model, batch)
        t1 = time.perf_counter()
        policy_part(model, batch, ref)
        ref_s.append(t1 - t0)
        pol_s.append(time.perf_counter() - t1)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    return {"reference_s": statistics.mean(ref_s), "policy_s": statistics.mean(pol_s),
            "reference_share": sum(ref_s) / (sum(ref_s) + sum(pol_s)), "tokens_per_batch": statistics.mean(tokens),
            "sequences_per_batch": 2 * args.batch_size}  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the folder scripts/e2e_preference.py wrote")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch")
    parser.add_argument("--part", choices=("reference", "policy"), help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.part:
        print(json.dumps({args.part: peak_growth(args, args.part)}))
        return 0
    result = timings(args)
    for part in ("reference", "policy"):
        child = [sys.executable, __file__, "--data", str(args.data), "--batches", str(args.batches),
                 "--batch-size", str(args.batch_size), "--part", part]  # fmt: skip
        # Every large block is its own mapping, returned on free: the resident size follows the live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(child, check=True, capture_output=True, text=True, env=env).stdout
        result[f"{part}_peak_growth_mib"] = json.loads(out.strip().splitlines()[-1])[part]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
