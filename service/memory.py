"""Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

The protocol allocates and frees many short-lived arrays of a few hundred KB per round. By
default glibc serves those with fresh mmap()s and returns them on free, so every round pays
page faults again, which cost about a microsecond per 4 KB page on these VMs. Raising the mmap
and trim thresholds lets freed blocks be reused: one party's forward pass of the CNN at batch
16 went from 12.6 to 7.7 ms of CPU (`python -m benchmarks.engine` measures the effect end to
end). The price is that a process keeps its peak heap (tens of MB for a replica).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Set the thresholds for this process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
