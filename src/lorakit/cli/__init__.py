"""The `lorakit` command: thin; parses arguments and calls the API.

Each subcommand is one module of this package (``cli/train.py``, ``cli/serve.py`` ...), parsing with the
argument groups of ``cli/common.py`` and calling the library; modules are imported lazily, so `lorakit info`
does not pay for importing the trainer or the benchmark suite.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

# name → (module:function taking argv and returning an exit code, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lorakit.cli.demo:demo_main", "fine-tune minilm-l6 with LoRA on shipped movie reviews, end to end"),
    "merge": ("lorakit.cli.merge:merge_main", "merge an adapter into its base and save a plain transformers folder"),
    "info": ("lorakit.cli.info:info_main", "show what an adapter directory holds"),
    "combine": ("lorakit.cli.combine:combine_main", "combine weighted adapters (linear, cat, svd, ties, dare)"),
    "train": ("lorakit.cli.train:train_main", "fine-tune a model on a task (LoRA or a baseline method)"),
    "eval": ("lorakit.cli.evaluate:eval_main", "score a base model + adapter on a task"),
    "data": ("lorakit.cli.data:data_main", "inspect training data as the model sees it (loss tokens marked)"),
    "generate": ("lorakit.cli.generate:generate_main", "generate text with a base model and adapters (streams)"),
    "classify": ("lorakit.cli.classify:classify_main",
                 "classify a CSV/TSV/JSONL file with one or more classification adapters (mixed batch)"),
    "export": ("lorakit.cli.export:export_main",
               "write an adapter or its merged model for llama.cpp, Ollama or transformers (gguf-adapter, gguf, hf)"),
    "compare": ("lorakit.cli.compare:compare_main", "run methods x seeds on a task, write a table + plot"),
    "latency": ("lorakit.cli.latency:latency_main", "inference latency of methods vs the base model"),
    "estimate": ("lorakit.cli.estimate:estimate_main", "trainable parameters, file sizes, memory"),
    "analyze": ("lorakit.cli.analyze:analyze_main", "spectra and subspace similarity of adapters"),
    "bench": ("lorakit.cli.bench:bench_main", "speed and memory benchmark, side by side with PEFT"),
    "serve": ("lorakit.cli.serve:serve_main", "OpenAI-compatible server: one base, many adapters, batched"),
}


def _usage() -> str:
    lines = ["usage: lorakit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `lorakit COMMAND --help` for a command's options."]
    return "\n".join(lines)


# warnings raised by lorakit's own files (this module lies in lorakit/cli/)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def plain_lorakit_warnings() -> None:
    """Print lorakit's own warnings as one ``lorakit: warning:`` line, not Python's file:line plus the source
    line that raised it (which reads like a crash); other packages' warnings keep Python's format."""
    default = warnings.formatwarning
    if getattr(default, "lorakit_plain", False):
        return

    def formatwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
        if str(filename).startswith(_PACKAGE_DIR):
            return f"lorakit: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.lorakit_plain = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lorakit import __version__

        print(f"lorakit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    from lorakit.io.models import quiet_third_party_notices

    quiet_third_party_notices()
    plain_lorakit_warnings()
    if command not in SUBCOMMANDS:
        print(f"lorakit: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[command][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    from lorakit.errors import LorakitError

    try:
        return int(func(rest) or 0)
    except LorakitError as exc:
        print(f"lorakit {command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, read-only or missing paths: the user's to fix, not a lorakit bug
        print(f"lorakit {command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system failure: what went wrong and on which path(s).

    Args:
        exc: the error an operating-system call raised.
    """
    if exc.strerror is None:  # raised by a library with its own message (e.g. transformers)
        return " ".join(str(exc).split())
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = ": " + " -> ".join(str(p) for p in paths) if paths else ""
    return f"{exc.strerror}{where}"


if __name__ == "__main__":
    sys.exit(main())
