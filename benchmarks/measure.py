"""Device-synchronized timing, peak memory, the device's measured matmul peak, and profiler tables."""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ecar_infer.atomic import atomic_write_text

_STATM = Path("/proc/self/statm")
SAMPLE_S = 0.005
GPU_WARMUP_S = 0.5  # matmul_peak's warm-up on a GPU before its timed products


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of fn: CUDA events around it on a GPU (the device drained before and
    after), the wall clock elsewhere."""
    if device.type != "cuda":
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def write_profile(fn: Callable[[], Any], device: torch.device, path: Path, row_limit: int = 30) -> None:
    """One call of fn under torch.profiler, written to `path` as a table of the ops that take the time,
    by self device time on a GPU (kernel time, however the device is called) and self CPU time elsewhere.
    A profiler failure is written to the file instead: it costs the profile, never the measurements."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
            fn()
        sort = "self_device_time_total" if gpu else "self_cpu_time_total"
        atomic_write_text(path, prof.key_averages().table(sort_by=sort, row_limit=row_limit) + "\n")
    except Exception as err:  # any profiler failure (see above)
        atomic_write_text(path, f"profiling failed: {error_summary(err)}\n")


class DeviceFault(RuntimeError):
    """The device cannot run anything more in this process (a sticky CUDA error): a sweep stops here and
    keeps the rows it has, instead of recording every later row as the same error or dying unwritten."""


def is_device_fault(err: BaseException) -> bool:
    """Whether err is a CUDA error that poisons the context (an illegal address, a device-side assert, a
    failed launch), after which every CUDA call fails. Out of memory is not one: the next row may fit."""
    text = str(err)
    if "out of memory" in text.lower():
        return False
    return type(err).__name__ == "AcceleratorError" or "CUDA error" in text or "Triton Error [CUDA]" in text


def error_summary(err: BaseException) -> str:
    """'ErrorType: its first line' (at most 200 characters), as a benchmark row records a failure."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def release(device: torch.device) -> None:
    """Free what the last measurement left behind, so the next one starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class FaultWatch:
    """A sweep's first sticky device fault (is_device_fault): each row keeps its own error, and the sweep
    stops (DeviceFault) once the device cannot run anything more, with the rows so far written."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.fault: str | None = None

    def row_error(self, err: BaseException) -> str:
        """err as a row's one-line error, remembered as the fault if it left the device unusable."""
        text = error_summary(err)
        if is_device_fault(err):
            self.fault = self.fault or text
        return text

    def release(self) -> None:
        try:
            release(self.device)
        except Exception as err:  # after a sticky CUDA error even freeing the cache fails
            self.fault = self.fault or error_summary(err)

    def stop_if_faulted(self) -> None:
        if self.fault:
            raise DeviceFault(self.fault)


def median(values: list[float]) -> float:
    return statistics.median(values)


def _rss_bytes() -> int:
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):   # glibc's struct mallinfo2 (malloc.h), every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader() -> Callable[[], int] | None:
    """Bytes the C heap has handed out and not had back (glibc >= 2.33: mallinfo2's in-use bytes of every
    arena plus its mmapped chunks), or None where the C library has no mallinfo2.

    On the CPU torch allocates tensors with malloc, so this follows what is live. The resident set does not
    where freed memory is kept for reuse (ecar_infer.cpu_memory): it only grows, and a row after a larger
    one read 0 MiB."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd
    return in_use


_HEAP_IN_USE = _heap_reader()


class PeakMemory:
    """Peak memory of what runs inside the block, in bytes (None where it cannot be measured).

    CUDA: torch.cuda.max_memory_allocated, which includes every resident tensor (the model's weights).
    A replayed CUDA graph allocates nothing: its activations live in the graph's private pool, which is
    reserved, never allocated, so the graph path's peak_bytes leaves them out. reserved_bytes
    (torch.cuda.max_memory_reserved: graph pools and the allocator's cache included) is what the process
    holds, and the figure to compare between the graph and eager paths.
    CPU: the peak, sampled every 5 ms by a thread, of the C heap's bytes in use (glibc), minus their count
    on entry (a peak that lasts less than 5 ms can be missed); elsewhere on Linux the same of the resident set
    (which only grows where freed memory is kept for reuse: a row after a larger one reads 0).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.reserved_bytes: int | None = None  # CUDA only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._max = 0

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return ("torch.cuda.max_memory_allocated (weights included; CUDA graph activations excluded), and "
                    "max_memory_reserved (graph pools and cache included) in parentheses")
        if _HEAP_IN_USE is not None:
            return "growth of the C heap's bytes in use (glibc mallinfo2), sampled every 5 ms"
        return "resident set growth, sampled every 5 ms" if _STATM.exists() else "n/a"

    @staticmethod
    def _cpu_bytes() -> int:
        return _HEAP_IN_USE() if _HEAP_IN_USE is not None else _rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._max = max(self._max, self._cpu_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _HEAP_IN_USE is not None or _STATM.exists():
            self._base = self._max = self._cpu_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._max, self._cpu_bytes()) - self._base


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> dict[str, Any]:
    """The device's measured matmul peak in FLOP/s, the MFU reference: the fastest of `repeats` products
    after warm-up (a peak is the best rate reached; on a shared CPU the typical rate sinks with the load).

    GPU: an 8192^3 product in `dtype` (bf16 by default). CPU: a 2048^3 fp32 product.
    """
    n, dtype = (8192, dtype) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        # an idle GPU's clocks take a while to rise under load: three products (~4 ms on an H100) are too few,
        # and a peak measured low would inflate every MFU of the run
        deadline = time.perf_counter() + GPU_WARMUP_S
        while time.perf_counter() < deadline:
            a @ b
            torch.cuda.synchronize(device)
    seconds = min(time_call(lambda: a @ b, device) for _ in range(repeats))
    return {"flops_per_s": 2 * n ** 3 / seconds, "how": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul, "
                                                        f"fastest of {repeats}"}
