"""glibc malloc tuning: a fixed mmap threshold, and the C heap's free pages handed back to the system. Each a
no-op returning ``False`` where the C library has no such function. Standard library only."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold", "release_free_heap"]


def _glibc_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """A function of glibc's malloc, or ``None`` where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return _glibc_function("malloc_trim", [ctypes.c_size_t])


# glibc's malloc.h; its environment variables of the same settings, which a user's choice arrives by.
_M_MMAP_THRESHOLD = -3
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Fixes glibc's mmap threshold at ``size`` bytes for this process (``mallopt(M_MMAP_THRESHOLD)``), so that
    memory a burst of long inputs freed can be handed back; ``False`` where the C library cannot, or where the
    user set glibc's thresholds in the environment (theirs are kept).

    By default glibc raises the threshold to the size of each large block freed (up to 32 MB) and the trim
    threshold to twice that, after which such blocks come from the per-thread heaps instead of their own
    ``mmap``; what those heaps keep at their top, ``malloc_trim`` does not return. A fixed threshold keeps
    allocations of ``size`` or more in their own mappings, which go back to the system when freed.
    """
    if any(name in os.environ for name in _MALLOC_ENVIRONMENT):
        return False
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, size) == 1


def release_free_heap() -> bool:
    """Hands the C heap's free pages back to the system (glibc's ``malloc_trim(0)``); ``False`` where the C
    library cannot.

    Memory a program frees stays in glibc's heaps (one per thread that allocates) unless it sits at a heap's top
    or came from its own ``mmap``; after ONNX Runtime shrinks its arena, the freed buffers below the dynamic mmap
    threshold would otherwise keep the process's RSS up.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
