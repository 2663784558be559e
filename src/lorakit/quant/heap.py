"""glibc's heap and what RSS shows: freed tensor memory handed back to the OS when memory is the point.

glibc serves allocations under its mmap threshold from the heap and keeps freed heap pages. The threshold
adapts upwards (to 32 MiB) once a big block is freed, so layer-sized tensors (a few MiB) end up on the heap
and a training step's freed activations stay resident: on SmolLM2-135M with an NF4 base and checkpointing,
the process peaked at ~1.2 GiB while its live tensors needed ~0.85 GiB. Elsewhere than glibc these do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024  # fixed: setting it also turns off the adaptive raise


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, once per process (``trim_heap`` runs once per layer while a quantized model loads)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
            return libc
    return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS now (``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mapping, returned to the OS when freed.

    Args:
        nbytes: the threshold; setting it also turns off glibc's adaptive raise for the process.

    Returns whether glibc took the setting (False elsewhere than glibc).
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, nbytes))


def return_freed_memory_promptly() -> bool:
    """From now on, serve every allocation of 256 KiB or more with its own mapping, returned when freed.

    Costs page faults on reuse (measured in ``docs/records/quantization.md``); lorakit turns it on for a
    quantized base, where peak memory is what the user asked to save. Returns whether glibc took the setting.
    """
    return set_mmap_threshold(MMAP_THRESHOLD_BYTES)
