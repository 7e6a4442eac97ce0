"""Process settings that make CPU inference timings steady. Nothing here runs unless called.

glibc's malloc returns large freed blocks to the operating system (blocks above its mmap threshold, and the top of
the heap above its trim threshold), so the next activation of that size page-faults on every 4 KB page it touches.
In a virtual machine a fault costs ~1-2 us: on the 2-core KVM guests of benchmarks/README.md a 1 MB convolution
output cost 0.8 ms in one call and 0.09 ms in the next, depending only on where the allocator had left its heap,
for the float model and the quantized one alike. `steady_malloc()` keeps freed memory in the heap (what jemalloc or
tcmalloc, which PyTorch CPU deployment guides recommend, do by themselves); the same effect from the shell, before
Python starts: `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`.
"""
from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are still mapped and unmapped per allocation
TRIM_THRESHOLD = 1 << 30


def steady_malloc() -> bool:
    """Keep freed blocks below 32 MB in the heap and never trim it (glibc only): True if applied. It changes the
    whole process's allocator (memory freed by one model is kept for the next allocation), so it is for a
    process that serves or measures models, not something a library call does behind its caller's back."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
