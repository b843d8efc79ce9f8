"""Keep freed host memory in the process, so a step's temporary tensors reuse pages instead of faulting them in.

glibc's malloc hands memory back to the kernel whenever the free space at the top of its heap passes a
threshold, and serves large blocks with their own mmap. Its thresholds adapt only part of the way to a
step loop that frees and reallocates the same few-MB activations every step: each step then gets fresh
zeroed pages from the kernel, one page fault per 4 KiB. Measured on the diffusion fixture (batch 16,
2 threads): 1,450-2,300 page faults a UNet forward with the defaults, none with the thresholds fixed, and
1.14x the images/s (median of 4 alternating pairs, ``docs/benchmarks/cpu_policy.md``). The AR engine faults
far less (about 7 a token at 32 streams, 108 M); its gain is inside a 2-core host's noise.

The fix is the one glibc documents: fixed ``M_TRIM_THRESHOLD`` and ``M_MMAP_THRESHOLD`` (``mallopt``). Freed
memory then stays in the heap for the next step; the heap never outgrows the process's own peak of
blocks under ``MMAP_THRESHOLD_BYTES`` (bigger ones still get their own mapping and go back at once).
Nothing changes when the user tuned malloc through the environment, or when malloc is not glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest dynamic threshold on 64-bit hosts
MALLOC_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def malloc_tuned_by_environment(environment: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the user set glibc's malloc thresholds, or preloaded another allocator (jemalloc, tcmalloc)."""
    return (any(name in environment for name in MALLOC_ENVIRONMENT)
            or "glibc.malloc." in environment.get("GLIBC_TUNABLES", "")
            or "malloc" in environment.get("LD_PRELOAD", ""))


def keep_freed_host_memory() -> str:
    """Fix glibc's trim and mmap thresholds for this process. Returns what was done, for the startup log:
    ``"kept"``, ``"environment"`` (the user's malloc settings rule) or ``"unsupported"`` (not glibc)."""
    if malloc_tuned_by_environment():
        return "environment"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl has a mallopt that does nothing)
    except (OSError, AttributeError):
        return "unsupported"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)):
        return "unsupported"
    return "kept"
