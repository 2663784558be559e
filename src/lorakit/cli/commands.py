"""Small CLI commands over adapter files: `lorakit merge` and `lorakit info`."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from lorakit.io.fsutil import debug_kill_point, file_mode, remove, replace_path, stale_temps


def merge_main(argv: list[str]) -> int:
    """``lorakit merge``: fold an adapter into its base and write a plain transformers folder atomically."""
    parser = argparse.ArgumentParser(prog="lorakit merge", description="Merge an adapter into its base model "
                                     "and save a plain transformers folder (loads without lorakit).")
    parser.add_argument("--model", required=True, help="built-in name, local folder or hub id of the base")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter directory")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="dtype the base is loaded in and the merged model written in; ΔW is added in fp32 "
                        "and rounded once (default: fp32)")  # fmt: skip
    args = parser.parse_args(argv)

    from lorakit.io.files import load_adapter
    from lorakit.io.models import load_model
    from lorakit.lora.adapters import merge_and_unload

    check_new_output(args.out, args.overwrite)  # before minutes of loading and merging
    for name, source in (("adapter", args.adapter), ("model", Path(args.model))):
        if source.exists() and source.resolve().is_relative_to(args.out.resolve()):
            raise ConfigError(f"--out {args.out} holds the {name} being merged: --overwrite would delete it")
    parsed = read_adapter(args.adapter)
    task = "seq-cls" if parsed.raw_config.get("task_type") == "SEQ_CLS" else "causal-lm"
    kwargs = {}
    if task == "seq-cls":
        heads = [state["weight"] for state in parsed.saved_modules.values() if "weight" in state]
        if heads:
            kwargs["num_labels"] = heads[-1].shape[0]
    from lorakit.training.precision import DTYPES

    model, tokenizer = load_model(args.model, task=task, dtype=DTYPES[args.dtype], **kwargs)
    load_adapter(model, args.adapter)
    merged = merge_and_unload(model)
    write_folder_atomically(args.out, lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    print(f"merged {args.adapter} into {args.model} → {args.out}")
    return 0


def check_new_output(out: Path, overwrite: bool) -> None:
    """Refuse to write over an existing file or folder unless ``overwrite``: a merged model mixed into
    another model's folder (its config.json replaced, stale weight shards kept) loads as neither.

    Args:
        out: the output path.
        overwrite: whether replacing it was asked for.
    """
    if (out.exists() or out.is_symlink()) and not overwrite:
        kind = "folder" if out.is_dir() else "file"
        raise ConfigError(f"--out {out} already exists (a {kind}); pass --overwrite to replace it")


def write_folder_atomically(out: Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` fill a fresh sibling folder of ``out``, then put it at ``out`` in one step.

    A kill at any moment leaves ``out`` as it was (absent, or the old contents) or complete; the
    temporary folder a killed writer leaves is removed by the next write to the same ``out``.

    Args:
        out: the folder to create or replace.
        write: fills the folder it is given.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old.tmp-*"):
        for leftover in stale_temps(out.parent, pattern):
            remove(leftover)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, file_mode())  # safetensors writes 0600, the JSON beside it 0644: one mode
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        debug_kill_point("folder:written")
        replace_path(tmp, out)
        debug_kill_point("folder:replaced")
    finally:
        remove(tmp)  # still there only if something failed
    return out


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
