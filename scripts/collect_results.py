"""Print the markdown tables of docs/records/results.md from the runs under runs/results (see results_*.sh)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results")
GLUE = [("sst2", "SST-2", "accuracy"), ("mrpc", "MRPC", "accuracy"), ("mrpc", "MRPC", "f1"),
        ("rte", "RTE", "accuracy"), ("cola", "CoLA", "matthews_corr")]
E2E = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]


def seeds(task: str, method: str, metric: str) -> list[float]:
    files = sorted((ROOT / "glue" / task / method).glob("seed-*/eval_results.json"))
    return [json.loads(f.read_text())[metric] for f in files]


def cell(values: list[float]) -> str:
    if not values:
        return "not run"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.median(values):.1f} ± {100 * spread:.1f} (n={len(values)})"


print("| method | trainable params | " + " | ".join(f"{name} {metric}" for _, name, metric in GLUE) + " |")
print("|---|---:|" + "---:|" * len(GLUE))
for method, params in (("lora", "74,498 (LoRA 73,728 + head 770)"), ("head", "770")):
    print(f"| {method} | {params} | " + " | ".join(cell(seeds(t, method, m)) for t, _, m in GLUE) + " |")

print()
print("| model | " + " | ".join(E2E) + " |")
print("|---|" + "---:|" * len(E2E))
rows = [("smollm2-135m zero-shot (base)", ROOT / "e2e" / "base.json"),
        ("smollm2-135m + LoRA q,v r=8 (460,800 params)", ROOT / "e2e" / "r8-s1" / "eval_results.json")]
for label, path in rows:
    scores = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
    print(f"| {label} | " + " | ".join(f"{scores[k]:.4f}" if k in scores else "-" for k in E2E) + " |")
