"""`lorakit merge`: fold an adapter into its base and write a plain transformers folder atomically."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.io.bases import base_for
from lorakit.io.files import read_adapter
from lorakit.io.outputs import claim_output, output_lock, write_folder_atomically


def merge_main(argv: list[str]) -> int:
    """``lorakit merge``: fold an adapter into its base and write a plain transformers folder atomically.

    Args:
        argv: the arguments after ``merge``.
    """
    parser = argparse.ArgumentParser(prog="lorakit merge", description="Merge an adapter into its base model "
                                     "and save a plain transformers folder (loads without lorakit).")
    parser.add_argument("--model", help="built-in name, local folder or hub id of the base (default: the built-in "
                        "or local base the adapter names)")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter directory")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier merge at "
                        "--out, atomically (other files are kept)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="dtype the base is loaded in and the merged model written in; ΔW is added in fp32 "
                        "and rounded once (default: fp32)")  # fmt: skip
    args = parser.parse_args(argv)
    args.model = base_for(args.model, [args.adapter])
    out = Path(os.path.abspath(args.out))
    # The folder itself is swapped whole, so its lock lies beside it.
    with output_lock(out.parent / f".{out.name}.lock", out):
        for name, source in (("adapter", args.adapter), ("model", Path(args.model))):
            if source.exists() and source.resolve().is_relative_to(out.resolve()):
                raise ConfigError(f"--out {args.out} holds the {name} being merged: --overwrite would delete it")
        claim_output(out, "merge", overwrite=args.overwrite)  # before minutes of loading and merging
        merged, tokenizer = _merged(args.model, args.adapter, args.dtype)
        write_folder_atomically(out, lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
                                command="merge", overwrite=args.overwrite)  # fmt: skip
    print(f"merged {args.adapter} into {args.model} → {args.out}")
    return 0


def _merged(model_name: str, adapter: Path, dtype: str) -> tuple[object, object]:
    """(the base loaded in ``dtype`` with ``adapter`` merged in and unloaded, its tokenizer)."""
    from lorakit.io.files import load_adapter
    from lorakit.io.models import load_model
    from lorakit.lora.adapters import merge_and_unload
    from lorakit.training.precision import DTYPES

    parsed = read_adapter(adapter)
    task = "seq-cls" if parsed.raw_config.get("task_type") == "SEQ_CLS" else "causal-lm"
    kwargs = {}
    if task == "seq-cls":
        heads = [state["weight"] for state in parsed.saved_modules.values() if "weight" in state]
        if heads:
            kwargs["num_labels"] = heads[-1].shape[0]
    model, tokenizer = load_model(model_name, task=task, dtype=DTYPES[dtype], **kwargs)
    load_adapter(model, adapter)
    return merge_and_unload(model), tokenizer
