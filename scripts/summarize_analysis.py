"""Summarise runs/results/analysis/analysis.json (from `lorakit analyze`) for docs/records/results.md section 5."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results/analysis/analysis.json")
data = json.loads(path.read_text())
names = [Path(a).name for a in data["adapters"]]


def layer(module: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", module).group(1))


print("Subspace similarity of the top direction, φ(A₁, A₂, 1, 1), median over layers [min, max]:")
print("| pair | matrix | φ(1,1) adapters | mean φ(i,i) adapters | mean φ(i,i) random Gaussian |")
print("|---|---|---:|---:|---:|")
for pair in data["similarity"]:
    label = f"{names[pair['a']]} vs {names[pair['b']]}"
    for kind in ("q_proj", "v_proj"):
        rows = [v for m, v in pair["modules"].items() if m.endswith(kind)]
        top1 = [r["phi_top1"] for r in rows]
        diag = [r["phi_diag_mean"] for r in rows]
        rand = [r["random_diag_mean"] for r in rows]
        print(f"| {label} | W{kind[0]} | {statistics.median(top1):.3f} [{min(top1):.3f}, {max(top1):.3f}] | "
              f"{statistics.median(diag):.3f} | {statistics.median(rand):.3f} |")

print()
print("ΔW against W (paper's Table 7 quantities), for a middle and the last layer:")
print("| adapter | matrix | ‖ΔW‖_F | ‖UᵀWV‖_F, ΔW's directions | W's own top-r directions | random | ‖W‖_F "
      "| amplification |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
last = max(layer(m) for m in data["per_adapter"][0])
for i, per in enumerate(data["per_adapter"]):
    for module, row in sorted(per.items(), key=lambda kv: (layer(kv[0]), kv[0])):
        if layer(module) not in (last // 2, last):
            continue
        v = row["vs_w"]
        amp = "n/a" if v["amplification"] is None else f"{v['amplification']:.2f}"
        print(f"| {names[i]} | {module.replace('model.', '').replace('self_attn.', '')} | {v['delta_w_fro']:.3f} | "
              f"{v['proj_delta_w']:.3f} | {v['proj_w_top']:.2f} | {v['proj_random']:.3f} | {v['w_fro']:.1f} | {amp} |")
