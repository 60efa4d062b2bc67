"""Runs the engine's units: a CUDA graph per unit key, captured lazily and replayed; eager elsewhere.

A key names one unit of one engine: (batch bucket, step structure, dtype, unit kind, stage), see
StageEngine.key and StageEngine.units. The runner adds the backend forced at the call (force_backend,
ECAR_BACKEND), since a graph replays the kernels that dispatch chose when it was captured.

The first call of a key on CUDA runs the unit a few times on a side stream (warm-up: cuBLAS handles,
Triton autotuning, torch.compile), captures one run into a graph whose memory comes from a pool shared
by all of this runner's graphs, then replays it; later calls only replay. Sharing the pool is safe
because a unit keeps nothing it allocates: its results go to the engine's static buffers, which live
outside the pool, and units run one after another on one stream. Outputs therefore never alias, the
guided and unguided branches' included.

Units run eagerly where graphs are off (cuda_graphs=False), on any device but CUDA, and for a key whose
capture failed (logged once; that key stays eager). With compile=True each unit is first wrapped in
torch.compile (an optional mode, never required); the graphs then capture the compiled code.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Hashable

import torch

from .kernels.dispatch import forced_backend

logger = logging.getLogger("ecar_infer")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WARMUP_RUNS = 2
# every (engine, unit, stage) is its own torch.compile variant of a few methods; allow all of them
COMPILE_RECOMPILE_LIMIT = 256


def batch_bucket(batch: int) -> int:
    """The smallest bucket that holds `batch` images; beyond the largest, the next multiple of 256."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    for bucket in BATCH_BUCKETS:
        if batch <= bucket:
            return bucket
    step = BATCH_BUCKETS[-1]
    return -(-batch // step) * step


def recover_from_failed_capture(pool, stream: torch.cuda.Stream) -> None:
    """Undo what a capture into `pool` that raised leaves behind, so that later captures work; `stream` is the
    caller's stream, made current again."""
    # torch before 2.12 raises out of capture_end before it stops routing allocations into the pool
    # (pytorch#180395); the allocator then believes a capture is still running, and every later capture and
    # empty_cache() fails an internal assert. Stop it here; where torch already did, this raises.
    with contextlib.suppress(Exception):
        torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), pool)
    # torch.cuda.graph's exit raises (invalidated capture) before restoring the caller's stream
    torch.cuda.set_stream(stream)


class GraphRunner:
    def __init__(self, device: torch.device, cuda_graphs: bool = True, compile: bool = False) -> None:
        self.graphs_enabled = cuda_graphs and device.type == "cuda"
        self.compile = compile
        self.capture_seconds = 0.0  # wall time spent in warm-up and capture, all keys together
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._eager_keys: set[Hashable] = set()  # keys whose capture failed
        self._compiled: dict[Hashable, Callable[[], None]] = {}
        self._pool = None
        self._capture_stream: torch.cuda.Stream | None = None

    @property
    def num_captures(self) -> int:
        """How many graphs this runner has recorded."""
        return len(self._graphs)

    @property
    def num_failed_captures(self) -> int:
        """How many units run eagerly because their capture failed (each logged once)."""
        return len(self._eager_keys)

    def run(self, key: Hashable, fn: Callable[[], None]) -> None:
        """Run the unit `fn` named by `key`: replay its graph, capturing it first if needed, or run eagerly.
        On CUDA the caller makes the runner's device current (Sampler does, once per request): streams,
        graphs and Triton's launches follow the current device, torch's kernels their tensors'."""
        key = (key, forced_backend())
        if self.compile:
            fn = self._compiled_fn(key, fn)
        if not self.graphs_enabled or key in self._eager_keys:
            fn()
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, fn)
            if graph is None:
                fn()
                return
        graph.replay()

    def forget(self, engine_key: tuple) -> None:
        """Drop the graphs, compiled functions and eager marks of every unit of the engine named `engine_key`
        (a key is ((*engine_key, kind, stage), backend)). A graph holds the addresses of its engine's buffers,
        so an engine that is freed must be forgotten: a new engine of the same shape would replay the old
        graph on freed memory. Exact match, since an edit engine's key extends its plain engine's."""
        def of_engine(key) -> bool:
            return key[0][:-2] == engine_key
        for store in (self._graphs, self._compiled):
            for key in [key for key in store if of_engine(key)]:
                del store[key]
        self._eager_keys = {key for key in self._eager_keys if not of_engine(key)}

    def _compiled_fn(self, key: Hashable, fn: Callable[[], None]) -> Callable[[], None]:
        if key not in self._compiled:
            compiled = torch.compile(fn, dynamic=False)
            self._compiled[key] = torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT)(compiled)
        return self._compiled[key]

    def _capture(self, key: Hashable, fn: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        started = time.perf_counter()
        stream = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            if self._capture_stream is None:
                # torch.cuda.graph's default capture stream is one per process, made on whichever device was
                # current at the first capture: a runner on another device would capture nothing on it. One
                # stream of this runner's device, for all its graphs (they share one pool).
                self._capture_stream = torch.cuda.Stream()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream):
                fn()
        except Exception as err:  # any failure to warm up or capture: this key runs eagerly from now on
            logger.warning("ecar_infer: CUDA graph capture failed for unit %s; it runs eagerly: %s", key, err)
            recover_from_failed_capture(self._pool, stream)
            self._eager_keys.add(key)
            return None
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - started
        self._graphs[key] = graph
        return graph
