"""Small CLI commands over adapter files: `lorakit merge` and `lorakit info`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorakit merge", description="Merge an adapter into its base model "
                                     "and save a plain transformers folder (loads without lorakit).")
    parser.add_argument("--model", required=True, help="built-in name, local folder or hub id of the base")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter directory")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    args = parser.parse_args(argv)

    from lorakit.adapters import merge_and_unload
    from lorakit.files import load_adapter
    from lorakit.models import load_model

    parsed = read_adapter(args.adapter)
    task = "seq-cls" if parsed.raw_config.get("task_type") == "SEQ_CLS" else "causal-lm"
    kwargs = {}
    if task == "seq-cls":
        heads = [state["weight"] for state in parsed.saved_modules.values() if "weight" in state]
        if heads:
            kwargs["num_labels"] = heads[-1].shape[0]
    model, tokenizer = load_model(args.model, task=task, **kwargs)
    load_adapter(model, args.adapter)
    merge_and_unload(model).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged {args.adapter} into {args.model} → {args.out}")
    return 0


def info_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorakit info", description="What an adapter directory holds.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    parsed = read_adapter(args.adapter)
    meta = parsed.raw_config.get("lorakit") or {}
    ranks = sorted({a.shape[0] for slots in parsed.pairs.values() for a, _ in slots.values()})
    lora_params = sum(a.numel() + b.numel() for slots in parsed.pairs.values() for a, b in slots.values())
    other = sum(t.numel() for s in parsed.saved_modules.values() for t in s.values())
    other += sum(t.numel() for t in parsed.biases.values())
    info = {
        "path": str(args.adapter),
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
        "file_bytes": (args.adapter / WEIGHTS_NAME).stat().st_size + (args.adapter / CONFIG_NAME).stat().st_size,
        "modules": sorted(parsed.pairs),
    }
    from lorakit.serve.compat import vllm_report

    info["vllm_servable"], info["vllm_why_not"], info["vllm_notes"] = vllm_report(parsed)
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        if key == "modules":
            continue
        print(f"{key:<18}{value}")
    print("modules:")
    for name in info["modules"][:12]:
        print(f"  {name}")
    if len(info["modules"]) > 12:
        print(f"  ... {len(info['modules']) - 12} more")
    return 0
