"""PyTorch's fp32 ``F.linear`` against lorakit's oneDNN-packed linear (``lorakit.lora.packed``), side by side.

SmolLM2-135M's product shapes at a decode batch (32 rows) and a prefill (1024 rows), alternating the two
sides in one process: milliseconds per product, GFLOP/s, the ratio, and the largest difference between
the two results relative to their scale.

    python scripts/bench_packed_linear.py [--rows 32,1024] [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lorakit.lora.packed import pack_linears, packing_available

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576), "lm head": (576, 49152)}


def _seconds(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        layer(x)
    start = time.perf_counter()
    for _ in range(repeats):
        layer(x)
    return (time.perf_counter() - start) / repeats


def _row(name: str, rows: int, fan_in: int, fan_out: int, repeats: int) -> str:
    plain = nn.Linear(fan_in, fan_out, bias=False).requires_grad_(False)
    packed = nn.Linear(fan_in, fan_out, bias=False).requires_grad_(False)
    packed.weight.copy_(plain.weight)
    pack_linears(packed, batch_hint=rows)
    x = torch.randn(rows, fan_in)
    times = {"plain": [], "packed": []}
    for _ in range(3):  # alternate, so drift in the machine hits both sides alike
        times["plain"].append(_seconds(plain, x, repeats))
        times["packed"].append(_seconds(packed, x, repeats))
    t_plain, t_packed = min(times["plain"]), min(times["packed"])
    flop = 2 * rows * fan_in * fan_out
    ref = plain(x)
    diff = float((packed(x) - ref).abs().max() / ref.abs().max())
    return (f"| {name} | {rows} | {fan_in}×{fan_out} | {t_plain * 1e3:.3f} | {flop / t_plain / 1e9:.0f} | "
            f"{t_packed * 1e3:.3f} | {flop / t_packed / 1e9:.0f} | {t_plain / t_packed:.2f}× | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="32,1024", help="rows per product (comma list)")
    parser.add_argument("--repeats", type=int, default=30, help="products per timing")
    args = parser.parse_args()
    if not packing_available():
        raise SystemExit("this PyTorch build has no oneDNN packed linear")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| product | rows | in×out | F.linear ms | GFLOP/s | packed ms | GFLOP/s | speed-up | max rel. diff |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for rows in (int(r) for r in args.rows.split(",")):
            for name, (fan_in, fan_out) in SHAPES.items():
                print(_row(name, rows, fan_in, fan_out, max(3, args.repeats // (8 if fan_out > 10_000 else 1))),
                      flush=True)


if __name__ == "__main__":
    main()
