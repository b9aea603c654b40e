"""glibc malloc settings for the receiving processes of ``serve``.

A CT slice passes through the SCP as a few half-megabyte buffers (joined PDVs, Part 10 bytes, the
pixel data value). glibc serves such blocks with a fresh ``mmap`` or trims them off the heap when
freed, so every new buffer page-faults and is zeroed again. Higher mmap and trim thresholds keep
freed blocks in the heap for the next slice. Only for processes that do not score: torch's CPU
kernels are slower with these settings, so the worker keeps glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# blocks up to 4 MiB (any CT slice up to 1024x1024x16 bit) come from the heap; up to 32 MiB of free
# heap top per arena is kept (glibc's own cap for the mmap threshold is 32 MiB on 64-bit hosts)
RECEIVE_MMAP_THRESHOLD = 4 << 20
RECEIVE_TRIM_THRESHOLD = 32 << 20


def keep_freed_buffers(mmap_threshold: int = RECEIVE_MMAP_THRESHOLD,
                       trim_threshold: int = RECEIVE_TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; False (and no change) without glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
