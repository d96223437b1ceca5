"""Handing the C heap's free memory back to the system after a burst of large buffers
(a cold start's etcd pages), which glibc would otherwise keep mapped."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back this way
        return None
    return trim


def trim() -> bool:
    """glibc's `malloc_trim(0)`: free pages in every malloc arena go back to the system.
    gRPC receives and parses responses in buffers of megabytes; freed, they stay in
    the process (below the mmap threshold, or in a gRPC thread's own arena) and count
    in its RSS: 40-80 MB after listing 100,000 VMs in pages of 8 MiB. Returns whether
    the call was made (False where libc has no malloc_trim)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
