"""Allocator tuning for long-running inference."""
from __future__ import annotations

import ctypes
import os
import platform


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next frame instead of handing it back to the kernel (glibc only;
    returns whether it applied). A 480p frame allocates and frees tensors of 10-40 MB; glibc maps those afresh and
    unmaps them on free, so the kernel faults in and zeroes every page again on every frame: about 1/8 of
    lmrc-lite's frame time (docs/PERFORMANCE.md). With mmap off and no trimming the heap settles at what one frame
    needs and stays flat over a video. Process-wide, so the library never does it by itself (the command line
    does); LMRC_KEEP_MALLOC=1 opts out."""
    if os.environ.get("LMRC_KEEP_MALLOC") == "1" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_mmap_max, m_trim_threshold = -4, -1  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
