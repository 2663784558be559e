"""``lorakit export``: write an adapter, or the model it merges into, for another runtime.

``--format gguf-adapter`` (llama.cpp / Ollama adapter), ``gguf`` (merged, one file, plus an Ollama
Modelfile) and ``hf`` (merged transformers folder). The formats are registered in :mod:`lorakit.export`.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from lorakit.errors import ExportError
from lorakit.export import FORMATS, ExportRequest
from lorakit.io.outputs import output_lock


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit export", description="Write an adapter, or the model it "
                                     "merges into, in a format llama.cpp, Ollama or transformers loads.")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter directory")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="; ".join(f"{name}: {fmt.help}" for name, fmt in FORMATS.items()))
    parser.add_argument("--out", required=True, type=Path, help="output file (gguf formats) or folder (hf)")
    parser.add_argument("--model", help="base: built-in name, folder or hub id (default: the built-in "
                        "or local base the adapter names)")
    parser.add_argument("--dtype", help="; ".join(f"{name}: {'|'.join(fmt.dtypes)}" for name, fmt in FORMATS.items()))
    parser.add_argument("--base-gguf", type=Path, help="the base's GGUF file (default: a built-in's own)")
    parser.add_argument("--requantize", action="store_true",
                        help="gguf: write every tensor in --dtype, not only those the merge changed")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    return parser


def export_main(argv: list[str]) -> int:
    """``lorakit export``: parse the command line and run the chosen format's writer.

    Args:
        argv: the arguments after ``export``.
    """
    args = _parser().parse_args(argv)
    fmt = FORMATS[args.format]
    if args.dtype is not None and args.dtype not in fmt.dtypes:
        raise ExportError(f"--dtype {args.dtype!r} for --format {args.format}: choose from {', '.join(fmt.dtypes)}")
    if args.requantize and args.format != "gguf":
        raise ExportError("--requantize applies to --format gguf only")
    request = ExportRequest(adapter=args.adapter, out=args.out, model=args.model, dtype=args.dtype,
                            base_gguf=args.base_gguf, overwrite=args.overwrite, requantize=args.requantize)
    module_name, func_name = fmt.writer.split(":")
    out = Path(os.path.abspath(args.out))
    # One writer per --out; beside it, since a file or a folder swapped whole cannot hold its own lock.
    with output_lock(out.parent / f".{out.name}.lock", out):
        lines = getattr(importlib.import_module(module_name), func_name)(request)
    for line in lines:
        print(line)
    return 0
