"""The table scripts/gpu_check.sh prints: per setting, CUDA against CPU (losses, adapters, generations),
CUDA step time and peak memory, and the merged model's logits against base + adapter on CUDA."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SETTINGS = ("fp32", "bf16-base", "bf16-autocast", "nf4")


def last(records: list[dict], split: str) -> float:
    return [r["loss"] for r in records if r["split"] == split][-1]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def merged_gap(out: Path, name: str) -> float:
    """Largest |logit| difference between the merged folder and base + adapter, on CUDA."""
    from lorakit.io.files import load_adapter
    from lorakit.io.models import load_model

    dtype = torch.bfloat16 if name == "bf16-base" else torch.float32
    merged, tok = load_model(out / f"{name}-merged", dtype=dtype)
    model, _ = load_model("smollm2-135m", dtype=dtype)
    load_adapter(model, out / f"{name}-cuda")
    ids = tok("name : Aromi | food : Chinese", return_tensors="pt")["input_ids"].cuda()
    with torch.no_grad():
        a, b = merged.cuda()(ids).logits.float(), model.cuda()(ids).logits.float()
    return float((a - b).abs().max())


def row(out: Path, name: str) -> str:
    cpu, cuda = records(out / f"{name}-cpu"), records(out / f"{name}-cuda")
    train = [r for r in cuda if r["split"] == "train"]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(train)]
    a, b = load_file(out / f"{name}-cpu" / "adapter_model.safetensors"), load_file(
        out / f"{name}-cuda" / "adapter_model.safetensors")
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    gens = [(out / f"{name}-{d}.gen.jsonl").read_text() if (out / f"{name}-{d}.gen.jsonl").is_file() else ""
            for d in ("cpu", "cuda")]  # fmt: skip
    peak = max((r.get("cuda_peak_mib", float("nan")) for r in cuda if r["split"] == "train"), default=float("nan"))
    return (f"{name:<14} step {statistics.median(times[1:] or times):.3f} s  peak cuda {peak:.0f} MiB  "
            f"train loss cpu {last(cpu, 'train'):.4f} cuda {last(cuda, 'train'):.4f}  "
            f"valid Δ {abs(last(cpu, 'valid') - last(cuda, 'valid')):.4f}  adapter Δ {gap:.2e}  "
            f"generations {'same' if gens[0] == gens[1] and gens[0] else 'DIFFER'}  "
            f"merged logits Δ {merged_gap(out, name):.2e}")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name in SETTINGS:
        try:
            print(row(out, name))
        except (OSError, KeyError, IndexError, ValueError, RuntimeError) as exc:
            print(f"{name:<14} incomplete: {exc}")
