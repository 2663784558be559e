"""``--format hf``: the merged model as a transformers folder of safetensors shards, in the asked dtype.

The folder holds only what this export writes (weights, config, generation config, tokenizer files and the
marker of :func:`lorakit.io.outputs.mark_output` listing them), so a later ``--overwrite`` can tell it from a
folder of someone else's files and refuse those (:func:`lorakit.io.outputs.claim_output`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakit.export import ExportRequest
from lorakit.export.merged import load_merged
from lorakit.io.bases import base_for
from lorakit.io.files import read_adapter
from lorakit.io.outputs import claim_output, write_folder_atomically

HF_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SHARD_SIZE = "2GB"  # shards a hub upload takes comfortably; small bases stay one file


def base_dtype(config: Any) -> str:
    """The base's own dtype as an ``--dtype`` name (fp32 when its config names none lorakit writes).

    Args:
        config: the base's transformers config.
    """
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    names = {dtype: name for name, dtype in HF_DTYPES.items()}
    return names.get(own, "fp32")


def export_hf(request: ExportRequest) -> list[str]:
    """Write the merged model as safetensors shards at ``request.out`` (a folder), atomically.

    Args:
        request: the parsed command line.

    Returns:
        The lines to print.
    """
    from transformers import AutoConfig

    from lorakit.io.models import model_path

    # Before minutes of loading and merging; an earlier export holding the user's own files is refused whole.
    claim_output(request.out, "export", overwrite=request.overwrite, refuse_foreign=True)
    parsed = read_adapter(request.adapter)
    name = base_for(request.model, [request.adapter])
    dtype = request.dtype or base_dtype(AutoConfig.from_pretrained(model_path(name)))
    merged = load_merged(parsed, request.adapter, name)
    model = merged.model.to(HF_DTYPES[dtype])

    shards: list[str] = []

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        merged.tokenizer.save_pretrained(tmp)
        shards.extend(p.name for p in tmp.glob("*.safetensors"))

    write_folder_atomically(request.out, write, command="export", overwrite=request.overwrite)
    return [f"wrote {request.out}: merged {request.adapter} into {name}, {dtype}, {len(shards)} safetensors "
            f"shard(s), {len(merged.changed)} weights changed by the merge"]
