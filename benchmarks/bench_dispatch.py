"""What the backend dispatch costs per call: a dispatched op against calling its reference function directly.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_dispatch

Times `ops.euler_step_` (dispatched) and `reference.euler_step_` (direct) on the CPU at the shape of one
unguided Euler step of the shipped digits model (x [1, 64, 16], fp32), and the same for
`layernorm_modulate` ([2, 64, 128]). Rounds of --calls back-to-back calls alternate between the two
functions; each number is the fastest round's mean (wall clock, microseconds per call: the best case is
the stable statistic on a shared machine). The difference is the dispatch overhead.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Sequence

import torch

from ecar_infer.kernels import ops, reference

from .report import environment, environment_line


def per_call_us(fns: Sequence[Callable[[], Any]], calls: int, rounds: int) -> list[float]:
    """Microseconds per call of each fn: the fastest of `rounds` rounds, the fns' rounds interleaved."""
    for fn in fns:  # warm-up: first-use logging, the dispatch's caches
        for _ in range(calls):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - started) / calls)
    return [b * 1e6 for b in best]


def cases() -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    x, v = torch.zeros(1, 64, 16), torch.randn(1, 64, 16)
    h, shift, scale = torch.randn(2, 64, 128), torch.randn(2, 128), torch.randn(2, 128)
    return [
        ("euler_step_ [1, 64, 16] fp32", lambda: ops.euler_step_(x, v, -0.1),
         lambda: reference.euler_step_(x, v, -0.1)),
        ("layernorm_modulate [2, 64, 128] fp32", lambda: ops.layernorm_modulate(h, shift, scale, 1e-6),
         lambda: reference.layernorm_modulate(h, shift, scale, 1e-6)),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dispatch", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="back-to-back calls per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"Environment: {environment_line(environment(torch.device('cpu')))}.")
    print("| op | dispatched us/call | reference us/call | overhead us/call |")
    print("|---|---|---|---|")
    for name, dispatched, direct in cases():
        d, r = per_call_us([dispatched, direct], args.calls, args.rounds)
        print(f"| {name} | {d:.1f} | {r:.1f} | {d - r:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
