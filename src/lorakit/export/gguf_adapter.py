"""``--format gguf-adapter``: a LoRA adapter llama.cpp loads with ``--lora FILE`` on the base's GGUF.

The file follows llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``, ``adapter.type =
lora``, one ``adapter.lora.alpha``, and per adapted weight ``<name>.weight.lora_a`` (A as stored, rank x in)
and ``.lora_b`` (B, out x rank), with B's rows of ``attn_q``/``attn_k`` in llama.cpp's permuted order.
llama.cpp scales every pair by ``alpha / rank`` (``llama_adapter_lora_weight::get_scale``, rank read from
B), so a module whose lorakit scale differs (rsLoRA, rank_pattern, alpha_pattern) gets its B multiplied by
``scale * rank / alpha``: llama.cpp then computes lorakit's ΔW exactly (up to one rounding of B).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from lorakit.errors import ExportError
from lorakit.export.dtypes import encode
from lorakit.export.llama_cpp_names import Layout, gguf_name, heads_of_rows, permute_rows
from lorakit.io.files import AdapterFile
from lorakit.lora.layers import WHOLE

ADAPTER_DTYPES = ("f32", "f16", "bf16")


def refusals(parsed: AdapterFile, layout: Layout | None, base_tensors: set[str] | None = None) -> list[str]:
    """Why each part of the adapter has no llama.cpp LoRA form, as ``module: reason`` (empty: it has one).

    Args:
        parsed: the adapter.
        layout: the base's llama.cpp layout (None: only the base-independent reasons).
        base_tensors: the base GGUF's tensor names, to refuse modules it lacks (None: not checked).
    """
    out = [f"{m}: DoRA magnitude vector (llama.cpp applies plain B·A only)" for m in sorted(parsed.magnitudes)]
    if parsed.config.use_dora and not parsed.magnitudes:
        out.append("(config): use_dora (llama.cpp applies plain B·A only)")
    out += [f"{m}: trained bias (a llama.cpp adapter holds LoRA A/B only)" for m in sorted(parsed.biases)]
    out += [f"{m}: modules_to_save copy (a llama.cpp adapter holds LoRA A/B only; export --format gguf merges it)"
            for m in sorted(parsed.saved_modules)]
    for module, slots in sorted(parsed.pairs.items()):
        if set(slots) != {WHOLE}:
            out.append(f"{module}: per-slice fused q/k/v LoRA ({', '.join(sorted(slots))}): llama.cpp adapts "
                       "whole weights, and one B·A over the fused weight is not the same update")
        elif module in parsed.embedding_modules:
            out.append(f"{module}: LoRA on the token embedding (not exported: llama.cpp flips A and B there)")
        elif layout is not None:
            out += _module_refusals(layout, module, base_tensors)
    return out


def _module_refusals(layout: Layout, module: str, base_tensors: set[str] | None) -> list[str]:
    name = gguf_name(layout, module)
    if name is None:
        return [f"{module}: llama.cpp's {layout.arch_name} graph has no tensor for it"]
    if name == "output" and layout.tied_embeddings:
        return [f"{module}: the base ties lm_head to the token embedding; its GGUF has no separate output"]
    if base_tensors is not None and f"{name}.weight" not in base_tensors:
        return [f"{module}: the base GGUF has no tensor {name}.weight"]
    return []


def check_exportable(parsed: AdapterFile, layout: Layout, base_tensors: set[str] | None = None) -> None:
    """Raise one line naming the first module llama.cpp cannot represent, and why.

    Args:
        parsed: the adapter.
        layout: the base's llama.cpp layout.
        base_tensors: the base GGUF's tensor names, if known.
    """
    reasons = refusals(parsed, layout, base_tensors)
    if reasons:
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        raise ExportError(f"cannot export to a llama.cpp adapter: {reasons[0]}{more}")


def file_alpha(parsed: AdapterFile) -> float:
    """The one ``adapter.lora.alpha`` written: the ``scale * rank`` most modules share, so their B is
    written unchanged (for a plain adapter that is its lora_alpha; for rsLoRA, alpha·sqrt(r)).

    Args:
        parsed: the adapter.
    """
    products = Counter(parsed.config.scaling_for(m) * parsed.config.rank_for(m) for m in parsed.pairs)
    return max(sorted(products), key=lambda p: products[p])


def adapter_tensors(parsed: AdapterFile, layout: Layout, alpha: float) -> dict[str, np.ndarray]:
    """{llama.cpp tensor name: fp32 array} for every LoRA pair, in llama.cpp's layout and scale.

    Args:
        parsed: an adapter that :func:`check_exportable` accepted.
        layout: the base's llama.cpp layout.
        alpha: the file's ``adapter.lora.alpha`` (:func:`file_alpha`).
    """
    out: dict[str, np.ndarray] = {}
    for module, slots in sorted(parsed.pairs.items()):
        a, b = (t.detach().float().numpy() for t in slots[WHOLE])
        rank = a.shape[0]
        factor = parsed.config.scaling_for(module) * rank / alpha
        if factor != 1.0:
            b = (b.astype(np.float64) * factor).astype(np.float32)
        name = gguf_name(layout, module)
        heads = heads_of_rows(layout, name)
        if heads is not None:
            b = permute_rows(b, heads)
        out[f"{name}.weight.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
        out[f"{name}.weight.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
    return out


def write_gguf_adapter(path: Path, parsed: AdapterFile, layout: Layout, dtype: str = "f32") -> dict[str, int]:
    """Write the adapter as llama.cpp's GGUF LoRA file at ``path`` (not atomic: the caller renames it).

    Args:
        path: the file to write.
        parsed: an adapter that :func:`check_exportable` accepted.
        layout: the base's llama.cpp layout.
        dtype: one of :data:`ADAPTER_DTYPES`.

    Returns:
        {"tensors": count, "alpha": the file's alpha}.
    """
    alpha = file_alpha(parsed)
    writer = gguf.GGUFWriter(path, arch=layout.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    tensors = adapter_tensors(parsed, layout, alpha)
    for name, array in tensors.items():
        data, qtype = encode(array, dtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(tensors), "alpha": alpha}


def read_delta_w(path: Path) -> dict[str, np.ndarray]:
    """{llama.cpp weight name: ΔW in llama.cpp's row order} the way llama.cpp applies a GGUF adapter file
    (``scale = alpha / rank``, rank = B's second axis). Used by tests and ``lorakit info`` checks.

    Args:
        path: a GGUF LoRA adapter.
    """
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    arrays = {t.name: _as_f32(t) for t in reader.tensors}
    out = {}
    for name, a in arrays.items():
        if name.endswith(".lora_a"):
            b = arrays[name[: -len("_a")] + "_b"]
            out[name[: -len(".lora_a")]] = (alpha / b.shape[1]) * (b.astype(np.float64) @ a.astype(np.float64))
    return out


def _as_f32(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor of a GGUF file as fp32, in numpy's (rows, columns) order."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
