"""Hot-path kernels at ecar-xl's real stage shapes, every backend that can run them, on one GPU.

Shapes: ecar-xl's, from its config and StagePlan: batch 64 doubled for guidance (128 rows through the AR
transformer and the flow head), width 1152, 16 heads of 72, head width 1280, token dim 16, stages of 1, 4,
16, 64 and 256 tokens after prefixes of 0, 1, 5, 21 and 85 (L = 341); bf16 activations, fp32 token states
(as in ecar_infer/engine.py).

What a figure means (the workplace's GPU method notes, /work/.library/device/METHOD.md):
* Kernel time, not launch time: each case and backend gets K argument sets of fresh random data (never
  zeros), K = argument_sets(...): enough that the bytes they cycle through exceed twice the L2, so that
  each call reads from device memory, not from the cache (K capped at MAX_SETS and by MEMORY_BUDGET; a
  case whose sets still fit is marked "in L2"). After one eager warm-up call per set on a side stream,
  one CUDA graph captures calls_per_graph(K) calls cycling through the sets; each round replays it once
  between CUDA events, and the time per call is the median replay time over its number of calls. The
  eager figure beside it (the same calls launched one by one from Python) is what an un-graphed caller
  pays. A backend whose capture raises is timed eagerly and marked so in the table.
* Floors from measured ceilings: once per session, a device-to-device copy of COPY_BYTES (bytes read plus
  written) and an 8192^3 bf16 matmul on random data give the bandwidth and the matmul rate; a case's floor
  is max(bytes / bandwidth, FLOPs / rate), counting each tensor's minimal traffic once. The datasheet
  rates are printed beside them.
extra_info carries every number; a markdown summary table is printed at the end. Skipped without CUDA;
the arithmetic is tested on the CPU (tests/test_bench_kernels.py).

    pytest benchmarks/bench_kernels.py --benchmark-only
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from ecar_infer import ECARConfig  # noqa: E402
from ecar_infer.graphs import recover_from_failed_capture  # noqa: E402
from ecar_infer.kernels import dispatch, flash, force_backend  # noqa: E402
from ecar_infer.stages import StagePlan  # noqa: E402

from benchmarks.measure import error_summary, matmul_peak, time_call  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Vendor datasheet rates (bytes/s of HBM, dense bf16 FLOP/s), matched on the device name; printed beside
# the measured ceilings, which the floors use. 'H100 80GB HBM3' is the SXM part.
DATASHEETS = {"H200": (4.8e12, 989e12), "H100 80GB HBM3": (3.35e12, 989e12)}
CALLS = 20            # calls per CUDA graph (more where there are more argument sets) and per eager round
ROUNDS = 15           # timed graph replays, after one warm-up replay
EAGER_ROUNDS = 5      # timed eager rounds
MAX_SETS = 64         # argument sets per case at most
MEMORY_BUDGET = 8 << 30  # bytes of argument sets per case at most (a kv cache set is ~200 MB)
COPY_BYTES = 1 << 30  # the bandwidth ceiling's copy (read once, written once)
CEILING_REPEATS = 5
CUDA = torch.device("cuda")

XL = ECARConfig.preset("ecar-xl")
PLAN = StagePlan(XL)
IMAGES = 64
ROWS = 2 * IMAGES  # guidance doubles the batch
WIDTH, HEADS, HEAD_DIM, HEAD_WIDTH, TOKEN_DIM, CHANNELS = (XL.width, XL.num_heads, XL.head_dim, XL.head_width,
                                                           XL.token_dim, XL.latent_channels)
STAGES = list(zip(PLAN.tokens, PLAN.prefixes))  # (tokens, prefix)
TOTAL = PLAN.total_tokens
ACT, STATE = torch.bfloat16, torch.float32
BF16, FP32 = 2, 4  # bytes per element


# ---- arithmetic (no GPU; tested in tests/test_bench_kernels.py) ----

def cycled_bytes(touched_bytes: int, set_bytes: int) -> int:
    """Bytes that change from one argument set to the next: what a call touches (Case.bytes), but at most
    the set's own storage, since outputs are allocated by the op and reuse the same memory call after call."""
    return min(touched_bytes, set_bytes)


def argument_sets(cycled: int, l2_bytes: int, set_bytes: int, cap: int = MAX_SETS,
                  memory_budget: int = MEMORY_BUDGET) -> int:
    """How many argument sets to cycle through: the fewest whose cycled bytes exceed twice the L2,
    at most `cap` and at most what `memory_budget` holds of sets allocating `set_bytes` each; at least 1."""
    wanted = 2 * l2_bytes // max(cycled, 1) + 1
    return max(1, min(wanted, cap, memory_budget // max(set_bytes, 1)))


def in_l2(sets: int, cycled: int, l2_bytes: int) -> bool:
    """True where `sets` sets of `cycled` bytes do not exceed twice the L2: the time may be the cache's."""
    return sets * cycled <= 2 * l2_bytes


def calls_per_graph(sets: int, calls: int = CALLS) -> int:
    """Calls in one graph (and one eager round): at least `calls`, and every set at least once."""
    return max(calls, sets)


def per_call_us(elapsed_ms: float, calls: int) -> float:
    """Microseconds per call of `calls` calls that took `elapsed_ms` (one replay, or one eager round)."""
    return elapsed_ms * 1e3 / calls


def copy_bandwidth(nbytes: int, elapsed_ms: float) -> float:
    """Bytes/s of a device-to-device copy of `nbytes`: read once and written once."""
    return 2 * nbytes / (elapsed_ms * 1e-3)


def floor_us(nbytes: int, flops: int, bandwidth: float, rate: float) -> float:
    """The roofline floor in microseconds: max(bytes / bandwidth, FLOPs / rate)."""
    return max(nbytes / bandwidth, flops / rate) * 1e6


def bound(nbytes: int, flops: int, bandwidth: float, rate: float) -> str:
    return "memory" if nbytes / bandwidth >= flops / rate else "compute"


def datasheet(device_name: str) -> tuple[str, float, float] | None:
    """(the entry's name, bytes/s, FLOP/s) from DATASHEETS for this device, or None."""
    for key, (bandwidth, rate) in DATASHEETS.items():
        if key in device_name:
            return key, bandwidth, rate
    return None


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    make: Callable[[], tuple]  # the op's arguments, allocated on the GPU
    bytes: int  # minimal traffic of one call: each tensor it must read or write, counted once
    flops: int


def _randn(*shape: int, dtype: torch.dtype = ACT) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype)


def _cases() -> list[Case]:
    cases = []
    for s, (n, prefix) in enumerate(STAGES):
        kv = prefix + n
        q_bytes = ROWS * n * HEADS * HEAD_DIM * BF16
        cases.append(Case(
            "stage_attention", f"s{s + 1} n={n} kv={kv}",
            lambda n=n, kv=kv: (_randn(ROWS, n, HEADS, HEAD_DIM), _randn(ROWS, TOTAL, HEADS, HEAD_DIM),
                                _randn(ROWS, TOTAL, HEADS, HEAD_DIM), kv),
            bytes=2 * q_bytes + 2 * ROWS * kv * HEADS * HEAD_DIM * BF16,  # q, out; k and v rows [0, kv)
            flops=4 * ROWS * HEADS * n * kv * HEAD_DIM))
    visible_pairs = sum(n * (prefix + n) for n, prefix in STAGES)
    cases.append(Case(
        "block_causal_attention", f"L={TOTAL}",
        lambda: (*(_randn(ROWS, TOTAL, HEADS, HEAD_DIM) for _ in range(3)), PLAN.stage_ids("cuda")),
        bytes=4 * ROWS * TOTAL * WIDTH * BF16, flops=4 * ROWS * HEADS * visible_pairs * HEAD_DIM))

    for s, (n, _) in enumerate(STAGES):
        act = ROWS * n * WIDTH * BF16
        mod = ROWS * WIDTH * BF16  # per sample
        x_shape = (ROWS, n, WIDTH)
        cases += [
            Case("layernorm_modulate", f"trunk s{s + 1} [{ROWS},{n},{WIDTH}]",
                 lambda x_shape=x_shape: (_randn(*x_shape), _randn(ROWS, WIDTH), _randn(ROWS, WIDTH), 1e-6),
                 bytes=2 * act + 2 * mod, flops=8 * ROWS * n * WIDTH),
            Case("gated_residual_layernorm_modulate", f"trunk s{s + 1} [{ROWS},{n},{WIDTH}]",
                 lambda x_shape=x_shape: (_randn(*x_shape), _randn(ROWS, WIDTH), _randn(*x_shape),
                                          _randn(ROWS, WIDTH), _randn(ROWS, WIDTH), 1e-6),
                 bytes=4 * act + 3 * mod, flops=10 * ROWS * n * WIDTH),
        ]
        rows = ROWS * n  # the flow head: one row per token, per-token modulation sliced from one GEMM output
        head_act = rows * HEAD_WIDTH * BF16

        def head_args(rows=rows):
            mods = _randn(rows, 5, HEAD_WIDTH)
            return _randn(rows, HEAD_WIDTH), mods[:, 2], _randn(rows, HEAD_WIDTH), mods[:, 3], mods[:, 4], 1e-6

        cases.append(Case("gated_residual_layernorm_modulate", f"head s{s + 1} [{rows},{HEAD_WIDTH}]", head_args,
                          bytes=7 * head_act, flops=10 * rows * HEAD_WIDTH))

        state = IMAGES * n * TOKEN_DIM
        cases += [
            Case("guided_euler_step_", f"s{s + 1} [{IMAGES},{n},{TOKEN_DIM}]",
                 lambda n=n: (_randn(IMAGES, n, TOKEN_DIM, dtype=STATE), _randn(IMAGES, n, TOKEN_DIM),
                              _randn(IMAGES, n, TOKEN_DIM), torch.full((IMAGES,), 3.0, device="cuda"), -0.05),
                 bytes=state * (2 * FP32 + 2 * BF16) + IMAGES * FP32, flops=5 * state),
            Case("euler_step_", f"s{s + 1} [{IMAGES},{n},{TOKEN_DIM}]",
                 lambda n=n: (_randn(IMAGES, n, TOKEN_DIM, dtype=STATE), _randn(IMAGES, n, TOKEN_DIM), -0.05),
                 bytes=state * (2 * FP32 + BF16), flops=2 * state),
        ]
    for s, side in enumerate(PLAN.latent_sides[:-1]):
        low = IMAGES * CHANNELS * side * side
        cases.append(Case(
            "upsample_renoise", f"s{s + 1}->s{s + 2} [{IMAGES},{CHANNELS},{side}]->{2 * side}",
            lambda side=side: (_randn(IMAGES, CHANNELS, side, side, dtype=STATE),
                               _randn(IMAGES, CHANNELS, 2 * side, 2 * side, dtype=STATE), 0.75, 0.6),
            bytes=low * FP32 + 2 * 4 * low * FP32, flops=6 * 4 * low))
    return cases


CASES = _cases()
# flash_func: flash_attn_func over the cache slices, benchmarked beside the registered kv-cache entry point.
EXTRA = {"stage_attention": ["flash_func"]}
PARAMS = [pytest.param(case, backend, id=f"{case.op}[{case.shape}]-{backend}")
          for case in CASES for backend in dispatch.registered(case.op) + EXTRA.get(case.op, [])]


@dataclass
class Result:
    case: Case
    backend: str
    sets: int
    in_l2: bool            # the sets do not exceed twice the L2 (capped by MAX_SETS or MEMORY_BUDGET)
    graphed: bool          # False: the capture raised and `us` is eager too
    us: float              # per call: graph replay (or eager, where not graphed)
    eager_us: float        # per call, launched one by one
    note: str = ""         # why the capture failed


SUMMARY: list[Result] = []
CEILINGS: dict[str, float] = {}  # filled by the `ceilings` fixture: bandwidth (bytes/s), matmul (FLOP/s), l2 (bytes)


# ---- timing on the GPU ----

def _event_ms(work: Callable[[], object]) -> float:
    """Milliseconds of the device work `work` queues, by CUDA events (measure.time_call)."""
    return 1e3 * time_call(work, CUDA)


def _storage_bytes(args: tuple) -> int:
    """Bytes allocated for one argument set (a view counts its whole storage, once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in args if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def _measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (median of CEILING_REPEATS copies) and bf16 matmul rate (measure.matmul_peak, the
    throughput harness's MFU reference) of this device, as it is now."""
    src = torch.randn(COPY_BYTES // FP32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = statistics.median(_event_ms(lambda: dst.copy_(src)) for _ in range(CEILING_REPEATS))
    bandwidth = copy_bandwidth(src.nbytes, copy_ms)
    del src, dst

    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return {"bandwidth": bandwidth, "matmul": matmul_peak(CUDA, torch.bfloat16)["flops_per_s"], "l2": float(l2)}


def _capture(fn: Callable, sets: list[tuple], calls: int) -> tuple[torch.cuda.CUDAGraph | None, str]:
    """One eager warm-up call per set on a side stream (it compiles and autotunes too), then a graph of
    `calls` calls cycling through the sets: torch's CUDA-graph recipe. (None, why) where the capture
    raises; a warm-up that raises fails the test, as the backend cannot run eagerly either."""
    stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for args in sets:
            fn(*args)
    stream.wait_stream(side)
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            for i in range(calls):
                fn(*sets[i % len(sets)])
    except Exception as err:
        recover_from_failed_capture(pool, stream)  # so that the next case can capture
        torch.cuda.synchronize()
        return None, error_summary(err)
    torch.cuda.synchronize()
    return graph, ""


def _backend_fn(case: Case, backend: str, args: tuple) -> Callable:
    if backend == "flash_func":
        if not flash.supports(*args):
            pytest.skip("flash-attn cannot run this call")
        return flash.stage_attention_func
    with force_backend(backend):
        chosen = dispatch.select(case.op, *args)
    if chosen.name != backend:
        pytest.skip(f"{backend} cannot run this call")
    return chosen.fn


@pytest.fixture(scope="module")
def ceilings() -> dict[str, float]:
    if not CEILINGS:
        CEILINGS.update(_measure_ceilings())
    return CEILINGS


def _summary_lines() -> list[str]:
    name = torch.cuda.get_device_name()
    bandwidth, rate, l2 = CEILINGS["bandwidth"], CEILINGS["matmul"], CEILINGS["l2"]
    sheet = datasheet(name)
    sheet_text = (f"datasheet ({sheet[0]}): {sheet[1] / 1e12:.2f} TB/s, {sheet[2] / 1e12:.0f} TFLOP/s" if sheet
                  else "no datasheet entry for this device")
    lines = ["", f"Kernel times on {name}, L2 {l2 / 1e6:.0f} MB: us per call, median CUDA-graph replay / calls "
                 f"(eager: launched one by one)",
             f"Ceilings measured here: copy {bandwidth / 1e12:.2f} TB/s (read + write), bf16 matmul "
             f"{rate / 1e12:.0f} TFLOP/s; {sheet_text}. Floors use the measured ceilings.",
             "| op | shape | backend | sets | timed | us per call | eager us per call | floor us | bound "
             "| measured / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in SUMMARY:
        floor = floor_us(r.case.bytes, r.case.flops, bandwidth, rate)
        sets = f"{r.sets}, in L2" if r.in_l2 else str(r.sets)
        timed = "graph" if r.graphed else f"eager (capture failed [{len(notes) + 1}])"
        if not r.graphed:
            notes.append(f"[{len(notes) + 1}] {r.case.op}[{r.case.shape}]-{r.backend}: {r.note}")
        lines.append(f"| {r.case.op} | {r.case.shape} | {r.backend} | {sets} | {timed} | {r.us:.2f} "
                     f"| {r.eager_us:.2f} | {floor:.3g} | {bound(r.case.bytes, r.case.flops, bandwidth, rate)} "
                     f"| {r.us / floor:.1f}x |")
    return lines + notes


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if SUMMARY and CEILINGS:
        write = request.config.pluginmanager.get_plugin("terminalreporter").write_line
        for line in _summary_lines():
            write(line)


@pytest.mark.parametrize("case, backend", PARAMS)
def test_kernel(benchmark, ceilings: dict[str, float], case: Case, backend: str):
    torch.manual_seed(0)
    first = case.make()
    fn = _backend_fn(case, backend, first)
    l2 = int(ceilings["l2"])
    set_bytes = _storage_bytes(first)
    cycled = cycled_bytes(case.bytes, set_bytes)
    n_sets = argument_sets(cycled, l2, set_bytes)
    cached = in_l2(n_sets, cycled, l2)
    sets = [first] + [case.make() for _ in range(n_sets - 1)]  # fresh random data each
    calls = calls_per_graph(n_sets)
    graph, note = _capture(fn, sets, calls)  # its warm-up calls compile and autotune, outside any timing

    def eager() -> None:
        for i in range(calls):
            fn(*sets[i % n_sets])

    eager_ms = [_event_ms(eager) for _ in range(EAGER_ROUNDS)]
    timed_ms: list[float] = []
    replay = graph.replay if graph is not None else eager
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.pedantic(lambda: timed_ms.append(_event_ms(replay)), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    us = per_call_us(statistics.median(timed_ms[-ROUNDS:]), calls)  # the warm-up round comes first
    eager_us = per_call_us(statistics.median(eager_ms), calls)
    bandwidth, rate = ceilings["bandwidth"], ceilings["matmul"]
    floor = floor_us(case.bytes, case.flops, bandwidth, rate)
    sheet = datasheet(torch.cuda.get_device_name())
    benchmark.extra_info.update(
        backend=backend, timed="graph" if graph is not None else "eager", capture_error=note,
        argument_sets=n_sets, set_bytes=set_bytes, cycled_bytes=cycled, calls_per_graph=calls, in_l2=cached,
        measured_us_per_call=round(us, 3), eager_us_per_call=round(eager_us, 3), floor_us=round(floor, 4),
        bound=bound(case.bytes, case.flops, bandwidth, rate), bytes=case.bytes, flops=case.flops,
        measured_over_floor=round(us / floor, 2), l2_bytes=l2, measured_bandwidth=bandwidth,
        measured_matmul_flops=rate, datasheet=sheet and sheet[0], datasheet_bandwidth=sheet and sheet[1],
        datasheet_matmul_flops=sheet and sheet[2],
        datasheet_floor_us=sheet and round(floor_us(case.bytes, case.flops, sheet[1], sheet[2]), 4))
    SUMMARY.append(Result(case, backend, n_sets, cached, graph is not None, us, eager_us, note))
