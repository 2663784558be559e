"""`lorakit info`: what an adapter directory holds (``--json`` for one object on stdout)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter


def info_main(argv: list[str]) -> int:
    """``lorakit info``: print what an adapter directory holds.

    Args:
        argv: the arguments after ``info``.
    """
    parser = argparse.ArgumentParser(prog="lorakit info", description="What an adapter directory holds.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    info = _summary(args.adapter)
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        if key in ("modules", "runtimes"):
            continue
        print(f"{key:<18}{value}")
    _print_runtimes(info["runtimes"])
    print("modules:")
    for name in info["modules"][:12]:
        print(f"  {name}")
    if len(info["modules"]) > 12:
        print(f"  ... {len(info['modules']) - 12} more")
    return 0


def _summary(path: Path) -> dict[str, Any]:
    """What ``lorakit info`` reports about the adapter at ``path``."""
    parsed = read_adapter(path)
    meta = parsed.raw_config.get("lorakit") or {}
    ranks = sorted({a.shape[0] for slots in parsed.pairs.values() for a, _ in slots.values()})
    lora_params = sum(a.numel() + b.numel() for slots in parsed.pairs.values() for a, b in slots.values())
    other = sum(t.numel() for s in parsed.saved_modules.values() for t in s.values())
    other += sum(t.numel() for t in parsed.biases.values())
    info = {
        "path": str(path),
        "written_by": f"lorakit {meta['version']}" if meta.get("version") else "PEFT or another tool",
        "base_model": parsed.raw_config.get("base_model_name_or_path"),
        "task_type": parsed.raw_config.get("task_type"),
        "targets": list(parsed.config.targets),
        "adapted_modules": len(parsed.pairs),
        "ranks": ranks,
        "alpha": parsed.config.alpha,
        "use_rslora": parsed.config.use_rslora,
        "bias": parsed.config.bias,
        "fused_slices": meta.get("fused_slices") or {},
        "saved_modules": sorted(parsed.saved_modules),
        "lora_parameters": lora_params,
        "other_parameters": other,
        "file_bytes": (path / WEIGHTS_NAME).stat().st_size + (path / CONFIG_NAME).stat().st_size,
        "modules": sorted(parsed.pairs),
    }
    from lorakit.export.runtimes import runtime_report
    from lorakit.serve.compat import vllm_report

    info["vllm_servable"], info["vllm_why_not"], info["vllm_notes"] = vllm_report(parsed)
    info["runtimes"] = runtime_report(parsed)
    return info


def _print_runtimes(runtimes: dict[str, dict[str, Any]]) -> None:
    """One line per runtime: whether it loads the file as it is, else why not and the way there."""
    print("runtimes:")
    for name, verdict in runtimes.items():
        if verdict["servable"]:
            print(f"  {name:<10}yes: {verdict['route']}")
        else:
            route = f" (instead: {verdict['route']})" if verdict["route"] else ""
            print(f"  {name:<10}no: {'; '.join(verdict['why_not'])}{route}")
