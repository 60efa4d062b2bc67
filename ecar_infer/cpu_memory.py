"""Keep freed CPU memory in the process for reuse, instead of handing it back to the system (glibc only).

On the CPU, torch allocates every tensor with malloc. glibc serves a large request (above a dynamic
threshold of at most 32 MiB) with a fresh mmap and returns it to the system on free; smaller freed memory
at the top of the heap is trimmed back as well. Sampling makes the same large activations at every flow step
(the head's modulations of a 64-image guided batch are 46-59 MB each), so each step pays for page faults and
for zeroing fresh pages: for 64 guided digits32 or emoji32 images, 34,000-130,000 minor page faults and
0.09-0.30 s of system time per request on the project's 2-core EPYC (docs/BENCHMARKS.md, "CPU memory reuse").
With both thresholds raised, the heap keeps what was freed and the next step reuses it: at most a few
thousand page faults, no system time to speak of, 3-19% less time per request there, the same numbers. The
cost is that the process keeps its peak memory until it exits.

This changes the whole process, so the library never does it on its own: the programs (`ecar-sample`,
`ecar-edit`, `ecar-train`, the quality evaluations, the benchmarks) call `keep_freed_memory()` at start-up,
and a Python user may call it once. `ECAR_KEEP_FREED_MEMORY=0` turns it off everywhere.
"""
from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_UP_TO = 1 << 30  # allocations up to 1 GiB come from the heap; the heap is trimmed only above 2 GiB free
_TRIM_ABOVE = (1 << 31) - 1

ENV_VAR = "ECAR_KEEP_FREED_MEMORY"
_kept = False  # set once the thresholds are raised


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if they are raised. A no-op returning
    False where the C library is not glibc, or when ECAR_KEEP_FREED_MEMORY=0."""
    global _kept
    if not _kept and os.environ.get(ENV_VAR, "1").strip() != "0":
        _kept = _raise_thresholds()
    return _kept


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory() has taken effect in this process (benchmarks record it beside timings)."""
    return _kept


def _raise_thresholds() -> bool:
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
        libc.gnu_get_libc_version  # glibc's own symbol: the mallopt parameters above are glibc's
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; an old glibc refuses a threshold above 32 MiB, and then nothing changes
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_UP_TO)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
