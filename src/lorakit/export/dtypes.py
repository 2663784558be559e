"""The dtypes an export writes, as GGUF tensor types, encoded with the ``gguf`` package's own quantizers."""

from __future__ import annotations

import gguf
import numpy as np

from lorakit.errors import ExportError

GGUF_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(bytes or values as the GGUF writer takes them, their GGUF type) for an fp32 array.

    A Q8_0 tensor needs rows that are a multiple of its block (32): a row that is not is refused, as
    llama.cpp's converter would fall back to another type.

    Args:
        array: fp32 values in numpy's (rows, columns) order.
        dtype: a key of :data:`GGUF_TYPES`.
    """
    qtype = GGUF_TYPES[dtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        raise ExportError(f"a row of {array.shape[-1]} values does not split into {dtype} blocks of {block}")
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype
