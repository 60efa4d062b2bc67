"""CPU sampling with and without keep_freed_memory (ecar_infer/cpu_memory.py), side by side.

Each checkpoint and setting runs in its own fresh process (the allocator setting cannot be undone within a
process), the two settings alternating, so that a change in the machine's load hits both alike. Per request
of N images: the wall time, the process's user and system CPU time and its minor page faults (median over
the timed requests, after one warm-up request).

    python -m benchmarks.cpu_memory --ckpt weights/ecar-digits32.safetensors --n 64 --threads 1 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .report import markdown_table, write_outputs

# One process: load, warm up, time `repeats` requests; prints one JSON line.
WORKER = """
import json, resource, sys, time, torch
from ecar_infer import Sampler, keep_freed_memory
ckpt, n, steps, cfg, threads, repeats, seed = sys.argv[1:8]
torch.set_num_threads(int(threads))
kept = keep_freed_memory()
sampler = Sampler.from_pretrained(ckpt, device="cpu", progress=False)
kwargs = dict(seed=int(seed), cfg_scale=None if cfg == "default" else float(cfg),
              steps_per_stage=None if steps == "default" else int(steps))
labels = [k % sampler.config.num_classes for k in range(int(n))]
sampler.generate(labels, **kwargs)
rows = []
for _ in range(int(repeats)):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    sampler.generate(labels, **kwargs)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    rows.append([t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt])
print(json.dumps({"kept": kept, "rows": rows}))
"""
FIELDS = ("wall_s", "user_s", "sys_s", "minor_faults")


def run_worker(ckpt: str, args: argparse.Namespace, keep: bool) -> dict:
    env = {**os.environ, "ECAR_KEEP_FREED_MEMORY": "1" if keep else "0", "OMP_NUM_THREADS": str(args.threads)}
    argv = [ckpt, args.n, args.steps, args.cfg, args.threads, args.repeats, args.seed]
    out = subprocess.run([sys.executable, "-c", WORKER, *map(str, argv)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeatable)")
    parser.add_argument("--n", type=int, default=64, help="images per request")
    parser.add_argument("--steps", default="default", help="steps per stage (default: the checkpoint's)")
    parser.add_argument("--cfg", default="default", help="guidance scale (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per checkpoint and setting, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args(argv)
    results, table = [], []
    for ckpt in args.ckpt:
        samples = {False: [], True: []}
        for _ in range(args.rounds):
            for keep in (False, True):
                got = run_worker(ckpt, args, keep)
                if keep and not got["kept"]:
                    parser.exit(1, "keep_freed_memory() had no effect here (not glibc?): nothing to compare\n")
                samples[keep] += got["rows"]
        medians = {keep: [statistics.median(r[k] for r in rows) for k in range(len(FIELDS))]
                   for keep, rows in samples.items()}
        results.append({"ckpt": ckpt, **{("kept" if keep else "default"): dict(zip(FIELDS, m))
                                         for keep, m in medians.items()}})
        for keep, m in medians.items():
            table.append([Path(ckpt).name, "kept" if keep else "default", f"{m[0]:.3f}", f"{m[1]:.3f}", f"{m[2]:.3f}",
                          f"{m[3]:,.0f}"])
        table.append([Path(ckpt).name, "kept / default", f"{medians[True][0] / medians[False][0]:.2f}", "", "", ""])
    markdown = markdown_table(["checkpoint", "freed memory", "wall s", "user s", "sys s", "minor faults"], table)
    print(markdown)
    payload = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
               "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "results": results}
    write_outputs(payload, markdown, args.out, None, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
