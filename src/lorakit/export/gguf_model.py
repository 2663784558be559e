"""``--format gguf``: the merged model as one GGUF file, built on the base's own GGUF.

Every key of the base file (tokenizer, chat template, hyper-parameters) is copied the way ``gguf``'s own
``gguf_new_metadata.py`` copies them, and every tensor the merge did not change is copied byte for byte in
its original type (SmolLM2's built-in file: Q4_1 matrices, Q8_0 token embedding, F32 norms). Only the
weights the merge changed are written anew, in ``--dtype``, with q/k rows in llama.cpp's order;
``--requantize`` re-encodes every matrix in ``--dtype`` instead (norms and other vectors stay F32).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from lorakit.errors import ExportError
from lorakit.export import ExportRequest
from lorakit.export.base import Base, claim_gguf, resolve_base
from lorakit.export.dtypes import encode
from lorakit.export.llama_cpp_names import Layout, gguf_name, heads_of_rows, layout_of, permute_rows
from lorakit.export.merged import load_merged
from lorakit.export.ollama import modelfile_text
from lorakit.io.files import read_adapter
from lorakit.io.outputs import claim_file, starts_with, write_file_atomically

FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def changed_tensors(state: dict, changed: list[str], layout: Layout, names: set[str]) -> dict[str, np.ndarray]:
    """{GGUF tensor name: fp32 array in llama.cpp's layout} for every weight the merge changed.

    Args:
        state: the merged model's state dict.
        changed: the keys the merge changed.
        layout: the base's llama.cpp layout.
        names: the base GGUF's tensor names.
    """
    out = {}
    for key in changed:
        module, _, kind = key.rpartition(".")
        name = gguf_name(layout, module)
        if kind != "weight" or name is None or f"{name}.weight" not in names:
            raise ExportError(f"{key}: the merge changed it, but the base GGUF has no tensor for it")
        array = state[key].detach().float().numpy()
        heads = heads_of_rows(layout, name)
        out[f"{name}.weight"] = permute_rows(array, heads) if heads is not None else array
    return out


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type: int | None) -> None:
    """Copy every key of ``reader`` to ``writer`` (as gguf's ``gguf_new_metadata.py`` does), except the
    ones the writer writes itself; ``file_type`` replaces ``general.file_type`` when given.

    Args:
        reader: the base GGUF.
        writer: the new file.
        file_type: the new ``general.file_type`` or None to keep the base's.
    """
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE and file_type is not None:
            writer.add_file_type(file_type)
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def _tensors(reader: gguf.GGUFReader, new: dict[str, np.ndarray], dtype: str,
             requantize: bool) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(name, data, type) for the new file, in the base's order."""
    for tensor in reader.tensors:
        if tensor.name in new:
            yield tensor.name, *encode(new[tensor.name], dtype)
        elif requantize and len(tensor.shape) > 1:
            shape = tuple(int(n) for n in reversed(tensor.shape))
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            yield tensor.name, *encode(values.astype(np.float32), dtype)
        else:
            yield tensor.name, tensor.data, tensor.tensor_type


def write_gguf_model(path: Path, base_gguf: Path, new: dict[str, np.ndarray], dtype: str,
                     requantize: bool = False) -> dict[str, int]:
    """Write the base GGUF with the tensors of ``new`` replaced (not atomic: the caller renames it).

    Args:
        path: the file to write.
        base_gguf: the base's GGUF.
        new: {tensor name: fp32 array} to write in ``dtype``.
        dtype: a key of ``dtypes.GGUF_TYPES``.
        requantize: re-encode every matrix in ``dtype``, not only those in ``new``.

    Returns:
        {GGUF type name: tensor count} of the written file.
    """
    reader = gguf.GGUFReader(base_gguf)
    writer = gguf.GGUFWriter(path, arch=str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents()))
    writer.data_alignment = reader.alignment
    copy_fields(reader, writer, int(FILE_TYPES[dtype]) if requantize else None)
    counts: dict[str, int] = {}
    for name, data, qtype in _tensors(reader, new, dtype, requantize):
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def export_gguf_model(request: ExportRequest) -> list[str]:
    """Merge the adapter and write the base's GGUF with the changed weights replaced, plus a Modelfile.

    Args:
        request: the parsed command line.

    Returns:
        The lines to print.
    """
    dtype = request.dtype or "f16"
    modelfile = request.out.with_suffix(".Modelfile")
    claim_gguf(request.out, request.overwrite)
    claim_file(modelfile, overwrite=request.overwrite, owned=lambda path: starts_with(path, b"FROM ./"),
               what="a Modelfile lorakit wrote")
    parsed = read_adapter(request.adapter)
    base = _gguf_base(parsed, request)
    merged = load_merged(parsed, request.adapter, base.name)
    names = {t.name for t in gguf.GGUFReader(base.gguf_path).tensors}
    new = changed_tensors(merged.model.state_dict(), merged.changed, layout_of(base.config), names)
    counts: dict[str, int] = {}
    write_file_atomically(request.out, lambda tmp: counts.update(
        write_gguf_model(tmp, base.gguf_path, new, dtype, request.requantize)))
    text = modelfile_text(request.out, gguf.GGUFReader(request.out))
    write_file_atomically(modelfile, lambda tmp: tmp.write_text(text))
    kept = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    return [f"wrote {request.out}: {base.name} + {request.adapter} merged; {len(new)} changed tensors in "
            f"{dtype}; tensors by type: {kept}",
            f"wrote {modelfile}: ollama create NAME -f {modelfile}"]


def _gguf_base(parsed, request: ExportRequest) -> Base:
    base = resolve_base(parsed, request.adapter, request.model, request.base_gguf)
    if base.gguf_path is None:
        raise ExportError(f"--format gguf builds on the base's own GGUF: {base.name} has none; pass --base-gguf "
                          "FILE (e.g. from llama.cpp's convert_hf_to_gguf.py)")
    return base
