"""QLoRA bench: lorakit on an NF4 / int8 frozen base against PEFT fp32 LoRA, side by side in one run.

SmolLM2-135M, E2E, the same plain training loop, data order, seed and LoRA config on every side. Each side
runs in its own subprocess so its peak RSS (ru_maxrss) is its own; a sampler thread also records the peak
during training alone (after loading), which is where the quantized base pays off.

    OMP_NUM_THREADS=1 python scripts/bench_qlora.py --steps 100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "e2e")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The reference, lorakit's two schemes as `lorakit train --quantize` runs them, and PEFT fp32 with the same
# memory settings (checkpointing, glibc) as the like-for-like comparison: see Side.
SIDES = ("peft-fp32", "lorakit-nf4", "lorakit-int8", "peft-fp32-gc-heap")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class PeakSampler:
    """The highest RSS seen every 10 ms while running (ru_maxrss cannot be reset after loading)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mib())

    def __enter__(self) -> PeakSampler:
        self.peak = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _data(tokenizer, args) -> tuple[list[dict], list[dict]]:
    from lorakit.data.collate import encode_e2e_for_training, encoded_rows
    from lorakit.data.e2e import e2e_splits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the carve-a-split notice
        splits = e2e_splits(DATA, seed=args.seed)
    train = encoded_rows(encode_e2e_for_training(splits["train"], tokenizer, args.max_len))
    held = encoded_rows(encode_e2e_for_training(splits["valid"], tokenizer, args.max_len))[: args.eval_rows]
    return train, held


@dataclass(frozen=True)
class Side:
    """One side of the bench, from its name: ``<peft|lorakit>-<fp32|nf4|int8>[-gc|-nogc][-heap|-noheap]
    [-modelloss]``. Unless the name says otherwise, a side does what its library's user gets: PEFT a plain
    loop; lorakit on a quantized base what ``lorakit train --quantize`` does (load layer by layer, gradient
    checkpointing, glibc returning freed memory, the labels-only loss)."""

    name: str
    library: str
    precision: str
    checkpointing: bool
    heap: bool
    model_loss: bool

    @classmethod
    def parse(cls, name: str) -> Side:
        library, precision, *flags = name.split("-")
        if library not in ("peft", "lorakit") or precision not in ("fp32", "nf4", "int8"):
            raise SystemExit(f"bad side {name!r}: <peft|lorakit>-<fp32|nf4|int8>[-gc|-nogc][-heap|-noheap][-modelloss]")
        quantized = library == "lorakit" and precision != "fp32"
        flag = lambda on, off, default: True if on in flags else False if off in flags else default  # noqa: E731
        return cls(name, library, precision, flag("gc", "nogc", quantized), flag("heap", "noheap", quantized),
                   library == "peft" or "modelloss" in flags)


def _load(side: Side) -> tuple:
    """(model, tokenizer, info): quantized sides load as the trainer does, layer by layer."""
    from lorakit.io.models import load_model
    from lorakit.quant.heap import return_freed_memory_promptly

    if side.heap:
        return_freed_memory_promptly()
    if side.library == "peft" or side.precision == "fp32":
        model, tok = load_model("smollm2-135m")
        return model, tok, {}
    from lorakit.quant.load import load_quantized

    model, tok, report = load_quantized("smollm2-135m", side.precision)
    return model, tok, {"quantized_layers": len(report.layers), "dense_MiB": report.dense_bytes / 2**20,
                        "packed_MiB": report.packed_bytes / 2**20}


def _prepare(side: Side, model, args) -> dict:
    """Attach LoRA (PEFT's or lorakit's) and switch on gradient checkpointing where the side has it."""
    import torch

    torch.manual_seed(args.seed)
    if side.library == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=PEFT_TARGETS,
                                                 lora_dropout=0.0))
    else:
        from lorakit import LoraConfig, inject

        inject(model, LoraConfig(r=args.r, alpha=args.alpha, targets=("q", "k", "v", "o", "ffn"), init="kaiming"))
    if side.checkpointing:
        from lorakit.io.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.config.use_cache = False
    return {"model": model, "gradient_checkpointing": side.checkpointing, "heap_setting": side.heap,
            "labels_only_loss": not side.model_loss}


def _batches(rows: list[dict], batch: int, pad: int):
    import torch

    from lorakit.data.collate import collate_causal_lm

    for i in range(0, len(rows), batch):
        yield {k: torch.tensor(v) for k, v in collate_causal_lm(rows[i : i + batch], pad).items()}


def _held_out_loss(model, rows: list[dict], pad: int, batch: int) -> float:
    import torch

    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for b in _batches(rows, batch, pad):
            n = int((b["labels"][:, 1:] != -100).sum())
            total += model(**b).loss.item() * n
            tokens += n
    return total / tokens


def _loss(model, batch: dict, side: Side):
    """The model's own loss (what a PEFT user writes), or the trainer's: lorakit.lora.kernels.causal_lm_loss, the same
    value with the LM head only at labelled positions and in chunks."""
    if side.model_loss:
        return model(**batch).loss
    from lorakit.lora.kernels import causal_lm_loss

    return causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def _train(model, train: list[dict], args, pad: int, side: Side) -> list[float]:
    import torch

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    times = []
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(order) :][: args.batch]
        b = next(_batches([train[i] for i in idx], args.batch, pad))
        t = time.perf_counter()
        _loss(model, b, side).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def worker(name: str, args) -> dict:
    import torch

    import lorakit.quant.linear  # noqa: F401  (imports bitsandbytes on every side: equal baselines)

    torch.set_num_threads(args.threads)
    side = Side.parse(name)
    out = {"side": name, "rss_imports_MiB": _rss_mib()}
    model, tok, info = _load(side)
    out.update(info, rss_loaded_MiB=_rss_mib(), load_peak_MiB=_peak_mib())
    prepared = _prepare(side, model, args)
    model = prepared.pop("model")
    gc.collect()
    out.update(prepared, rss_prepared_MiB=_rss_mib())
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train, held = _data(tok, args)
    out["rss_data_MiB"] = _rss_mib()  # the tokenized E2E rows, before the first step
    with PeakSampler() as sampler:
        times = _train(model, train, args, tok.pad_token_id, side)
    out.update(train_peak_MiB=sampler.peak, step_s=statistics.median(times[5:] or times))
    out["held_out_loss"] = _held_out_loss(model, held, tok.pad_token_id, args.batch)
    out["peak_rss_MiB"] = _peak_mib()
    return out


def _row(r: dict, ref: dict) -> str:
    peak, loss = r["peak_rss_MiB"], r["held_out_loss"]
    return (f"{r['side']:<17} peak RSS {peak:7.0f} MiB ({peak / ref['peak_rss_MiB']:.2f}x)"
            f"  load peak {r['load_peak_MiB']:6.0f}"
            f"  train-phase peak {r['train_peak_MiB']:6.0f} ({r['train_peak_MiB'] / ref['train_peak_MiB']:.2f}x)"
            f"  loaded {r['rss_loaded_MiB']:5.0f} → prepared {r['rss_prepared_MiB']:5.0f}"
            f"  step {r['step_s']:.2f} s ({r['step_s'] / ref['step_s']:.2f}x)"
            f"  held-out loss {loss:.4f} ({100 * (loss / ref['held_out_loss'] - 1):+.2f} %)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sides", default=",".join(SIDES),
                   help=f"comma list from {(*SIDES, 'lorakit-fp32')}, any with -gc / -nogc")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    results = []
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--worker", side, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
        print(json.dumps(results[-1]), flush=True)
    print(f"\nSmolLM2-135M, E2E, {args.steps} steps, batch {args.batch}, max_len {args.max_len}, r={args.r}, "
          f"all 7 linears, threads {args.threads}")
    for r in results:
        print(_row(r, results[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
