"""CPU time of one 64-image request for several (checkpoint, settings) cases, timed in turns in one process.

    python -m benchmarks.request_time --case OLD.safetensors:4:10 --case ecar-digits32 \
        --case ecar-digits32:2:2:0,1 --rounds 6 --out times.json

A case is CKPT[:W[:STEPS[:LO,HI]]]: guidance weight W, steps per stage, guidance interval; what is left
out is the checkpoint's recommended setting. Every round runs every case once (the classes cycled, seed
0, output as numpy arrays), so a change of the machine's load falls on all cases alike; the first round is
a warm-up and the median of the others is reported, with each case's ratio to the first case. Freed memory
is kept for reuse, as ecar-sample does (ecar_infer/cpu_memory.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ecar_infer import Sampler, keep_freed_memory
from ecar_infer.command import interval_spec, steps_spec

from .report import environment, write_outputs

IMAGES = 64


def case_spec(text: str) -> dict:
    parts = text.split(":")
    if not 1 <= len(parts) <= 4 or not parts[0]:
        raise argparse.ArgumentTypeError(f"give CKPT[:W[:STEPS[:LO,HI]]], got {text!r}")
    settings = {}
    try:
        if len(parts) > 1:
            settings["cfg_scale"] = float(parts[1])
        if len(parts) > 2:
            settings["steps_per_stage"] = steps_spec(parts[2])
        if len(parts) > 3:
            settings["cfg_interval"] = interval_spec(parts[3])
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return {"ckpt": parts[0], "settings": settings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.request_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=case_spec, action="append", required=True, metavar="CKPT[:W[:STEPS[:LO,HI]]]")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all cases; the first is a warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON report")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first is a warm-up)")
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))   # date, CPU, threads and load, before the checkpoints load
    try:
        samplers = {c["ckpt"]: Sampler.from_pretrained(c["ckpt"], device="cpu", progress=False) for c in args.case}
    except ValueError as err:   # CheckpointError, VAEError: a file that is no checkpoint, or none
        parser.error(str(err))
    load_before = os.getloadavg()[0]
    times: list[list[float]] = [[] for _ in args.case]
    for round_ in range(args.rounds):
        for case, record in zip(args.case, times):
            sampler = samplers[case["ckpt"]]
            labels = [k % sampler.config.num_classes for k in range(IMAGES)]
            start = time.perf_counter()
            sampler.generate(labels, seed=0, output_type="np", progress=False, **case["settings"])
            if round_:
                record.append(time.perf_counter() - start)
    results = []
    for case, record in zip(args.case, times):
        sampler = samplers[case["ckpt"]]
        plan = sampler.plan(**case["settings"])
        results.append({**case, "resolved": {"max_guidance": max(max(st.guidance) for st in plan),
                                             "steps": [st.steps for st in plan],
                                             "guided_steps": [sum(st.guided) for st in plan]},
                        "median_s": statistics.median(record), "all_s": record})
    for r in results:
        r["speedup_vs_first"] = results[0]["median_s"] / r["median_s"]
        print(f"{r['median_s']:.3f} s  {results[0]['median_s'] / r['median_s']:.2f}x  {r['ckpt']} {r['settings'] or ''}"
              f" (steps {r['resolved']['steps']}, guided steps {r['resolved']['guided_steps']})")
    report = {"environment": env, "images": IMAGES, "threads": args.threads, "rounds": args.rounds,
              "torch": torch.__version__, "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0],
              "cases": results}
    write_outputs(report, "", args.out, None, args)


if __name__ == "__main__":
    main()
