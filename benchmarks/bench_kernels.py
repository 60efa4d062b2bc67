"""Hot-path kernels at ecar-xl's real stage shapes, every backend that can run them, on one GPU.

Shapes: ecar-xl's, from its config and StagePlan: batch 64 doubled for guidance (128 rows through the AR
transformer and the flow head), width 1152, 16 heads of 72, head width 1280, token dim 16, stages of 1, 4,
16, 64 and 256 tokens after prefixes of 0, 1, 5, 21 and 85 (L = 341); bf16 activations, fp32 token states
(as in ecar_infer/engine.py).

Each benchmark runs CALLS back-to-back calls per round and synchronizes; the time per call is measured
with CUDA events. Beside it stands the roofline floor, max(bytes / bandwidth, FLOPs / peak) for an
H100 SXM, counting each tensor's minimal traffic once. extra_info carries both; a markdown summary
table is printed at the end. Skipped without CUDA.

    pytest benchmarks/bench_kernels.py --benchmark-only
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from ecar_infer import ECARConfig  # noqa: E402
from ecar_infer.kernels import dispatch, flash, force_backend  # noqa: E402
from ecar_infer.stages import StagePlan  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
PEAK_FLOPS = 989e12        # H100 SXM dense bf16/fp16 tensor cores
CALLS = 20   # back-to-back calls per timed round
ROUNDS = 20

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


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    make: Callable[[], tuple]  # the op's arguments, allocated on the GPU
    bytes: int
    flops: int

    @property
    def floor_us(self) -> float:
        return max(self.bytes / HBM_BYTES_PER_S, self.flops / PEAK_FLOPS) * 1e6

    @property
    def bound(self) -> str:
        return "memory" if self.bytes / HBM_BYTES_PER_S >= self.flops / PEAK_FLOPS else "compute"


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
SUMMARY: list[tuple[Case, str, float]] = []


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


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if not SUMMARY:
        return
    write = request.config.pluginmanager.get_plugin("terminalreporter").write_line
    write("")
    write(f"Kernel times on {torch.cuda.get_device_name()} (us per call, CUDA events; floor: H100 SXM roofline)")
    write("| op | shape | backend | measured us | floor us | bound | measured / floor |")
    write("|---|---|---|---|---|---|---|")
    for case, backend, measured in SUMMARY:
        write(f"| {case.op} | {case.shape} | {backend} | {measured:.1f} | {case.floor_us:.3g} | {case.bound} "
              f"| {measured / case.floor_us:.1f}x |")


@pytest.mark.parametrize("case, backend", PARAMS)
def test_kernel(benchmark, case: Case, backend: str):
    torch.manual_seed(0)
    args = case.make()
    fn = _backend_fn(case, backend, args)
    fn(*args)  # autotune and compile outside the timed rounds
    torch.cuda.synchronize()
    per_call_ms: list[float] = []

    def rounds() -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn(*args)
        end.record()
        torch.cuda.synchronize()
        per_call_ms.append(start.elapsed_time(end) / CALLS)

    benchmark.group = f"{case.op} {case.shape}"
    benchmark.pedantic(rounds, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    timed = sorted(per_call_ms[-ROUNDS:])  # the warm-up rounds come first
    measured_us = timed[len(timed) // 2] * 1e3
    benchmark.extra_info.update(backend=backend, calls_per_round=CALLS, measured_us_per_call=round(measured_us, 2),
                                floor_us=round(case.floor_us, 3), bound=case.bound, bytes=case.bytes,
                                flops=case.flops, measured_over_floor=round(measured_us / case.floor_us, 2))
    SUMMARY.append((case, backend, measured_us))
