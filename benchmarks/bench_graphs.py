"""CUDA graphs (issue 6): the graph path against eager launches and the reference path, on a GPU.

    python -m benchmarks.bench_graphs --out DIR        # ecar-xl and ecar-b at batch 1, 64, 8, 256

Three paths through Sampler.generate on random weights, at the settings of benchmarks.throughput
(20 Euler steps per stage, guidance 4.0, so every flow step runs both branches):
* graphs: bf16, CUDA graphs (the default on CUDA): the batch padded to its bucket, every unit replayed;
* eager: bf16, cuda_graphs=False: the same kernels, launched one by one;
* reference: fp32, force_backend("reference"), no graphs, TF32 off: the plain-PyTorch oracle.
The VAE is the SD-VAE-architecture AutoencoderKL with random weights, in bf16 for the bf16 paths (as
Sampler.from_config builds it) and in fp32 for the reference.

Per (preset, batch, path): one untimed first call (for graphs it records the graphs: its capture time
is reported apart), then up to --repeats timed calls each with output_type="latent" (VAE decode
excluded) and "pt" (decode included), fewer once --row-seconds of timed calls are spent. Latency is the
median call, timed with CUDA events. A failing row (out of memory) records its error and the sweep goes
on; results are rewritten after every row, and the rows the targets name run first, so a run cut short
(Ctrl-C, `timeout -s INT`) keeps them; a CUDA error that leaves the device unusable stops the sweep there.
A full default sweep should take about 3 minutes on an H100 (an estimate from FLOP counts: not run yet).
For ecar-xl at batch 1 and 64, torch.profiler's top ops by device time for one call (decode included) of
the graph and eager paths go to DIR/profile-<preset>-b<batch>-<path>.txt, taken after all of the preset's
timed rows (the profiler leaves CUPTI attached, which slows later launches: pytorch#144455). Peak memory
includes every path's weights: the bf16 and the fp32 copies of the model stay resident for the whole preset.

Targets (issue 6; reported, never asserted): graphs >= 3x the reference at batch 1 and >= 1.5x at
batch 64; ecar-xl batch-1 latency including the VAE decode <= 20 ms on an H100.
--device cpu runs the same sweep eagerly on tiny presets (a smoke test of this script).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ecar_infer import ECARConfig, Sampler
from ecar_infer.kernels import force_backend
from ecar_infer.model import ECARModel
from ecar_infer.sampler import vae_dtype
from ecar_infer.vae import build_decoder, sd_vae_random

from .flops import GUIDANCE_SCALE, STEPS_PER_STAGE
from .measure import DeviceFault, FaultWatch, PeakMemory, error_summary, median, time_call, write_profile
from .report import environment, environment_line, markdown_table, write_outputs


@dataclass(frozen=True)
class PathSpec:
    dtype: torch.dtype
    cuda_graphs: bool
    backend: str
    tf32: bool


PATHS = {
    "graphs": PathSpec(torch.bfloat16, True, "auto", True),
    "eager": PathSpec(torch.bfloat16, False, "auto", True),
    "reference": PathSpec(torch.float32, False, "reference", False),
}
PROFILED = {"ecar-xl": (1, 64)}
PROFILED_PATHS = ("graphs", "eager")
# issue 6 targets, reported, never asserted
TARGET_SPEEDUP = {1: 3.0, 64: 1.5}
TARGET_LATENCY_PRESET, TARGET_LATENCY_S = "ecar-xl", 0.020


@dataclass
class Row:
    preset: str
    batch: int
    path: str
    latency_s: float | None = None                # one batch, VAE decode excluded
    latency_with_decode_s: float | None = None    # one batch, VAE decode included
    first_call_s: float | None = None             # the untimed first call (graphs: warm-up and capture)
    capture_s: float | None = None                # of which warm-up and capture
    captures: int = 0
    repeats: int = 0
    peak_bytes: int | None = None
    reserved_bytes: int | None = None             # graph pools included (measure.PeakMemory)
    error: str | None = None


def speedup(rows: list[Row], row: Row, field: str) -> float | None:
    ref = next((r for r in rows if (r.preset, r.batch, r.path) == (row.preset, row.batch, "reference")), None)
    ours, theirs = getattr(row, field), getattr(ref, field) if ref else None
    return theirs / ours if ours and theirs else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.out = Path(args.out)
        self.rows: list[Row] = []
        self.profiles: list[str] = []
        self.faults = FaultWatch(self.device)
        self.env = environment(self.device)

    # ---- setup -------------------------------------------------------------------------------------
    def models(self, config: ECARConfig) -> dict[torch.dtype, tuple[ECARModel, Any]]:
        """(model, decoder) per dtype the paths need, all from the same random weights; the decoder in the
        dtype the sampler gives it (sampler.vae_dtype)."""
        base = ECARModel(config).init_weights(self.args.seed, zero_init=False)
        out = {}
        for dtype in {PATHS[p].dtype for p in self.args.paths}:
            vae = sd_vae_random(self.args.seed, config=config) if config.latent_kind == "sd-vae" else None
            decoder = build_decoder(config, vae, self.device, vae_dtype(dtype))
            out[dtype] = copy.deepcopy(base).to(self.device, dtype).eval(), decoder
        return out

    # ---- measuring ---------------------------------------------------------------------------------
    def run_row(self, preset: str, config: ECARConfig, batch: int, path: str, model, decoder) -> Row:
        spec, row = PATHS[path], Row(preset, batch, path)
        sampler = Sampler(model, decoder, cuda_graphs=spec.cuda_graphs, tf32=spec.tf32, progress=False)
        labels = [k % config.num_classes for k in range(batch)]

        def call(output_type: str) -> Callable[[], Any]:
            return lambda: sampler.generate(labels, seed=self.args.seed, cfg_scale=self.args.cfg_scale,
                                            steps_per_stage=self.args.steps, output_type=output_type)

        try:
            with force_backend(spec.backend):
                row.first_call_s = time_call(call("pt"), self.device)
                row.capture_s, row.captures = sampler.runner.capture_seconds, sampler.runner.num_captures
                without, with_decode = [], []
                with PeakMemory(self.device) as memory:
                    while len(without) < self.args.repeats and (not without or
                                                                sum(without + with_decode) < self.args.row_seconds):
                        without.append(time_call(call("latent"), self.device))
                        with_decode.append(time_call(call("pt"), self.device))
                row.latency_s, row.latency_with_decode_s = median(without), median(with_decode)
                row.repeats, row.peak_bytes, row.reserved_bytes = len(without), memory.peak_bytes, memory.reserved_bytes
        except Exception as err:  # one failing row (OOM, a kernel that cannot run) must not end the sweep
            row.error = self.faults.row_error(err)
        del sampler
        self.faults.release()
        return row

    def profile(self, preset: str, config: ECARConfig, batch: int, path: str, model, decoder) -> None:
        """One call (decode included) under torch.profiler, after a warm-up call: the ops that take the time,
        by self device (or CPU) time."""
        spec = PATHS[path]
        sampler = Sampler(model, decoder, cuda_graphs=spec.cuda_graphs, tf32=spec.tf32, progress=False)
        labels = [k % config.num_classes for k in range(batch)]

        def call() -> Any:
            return sampler.generate(labels, seed=self.args.seed, cfg_scale=self.args.cfg_scale,
                                    steps_per_stage=self.args.steps, output_type="pt")

        file = self.out / f"profile-{preset}-b{batch}-{path}.txt"
        try:
            with force_backend(spec.backend):
                call()
                write_profile(call, self.device, file)
        except Exception as err:  # the warm-up call failed: a profile is never worth the rows, say why in its file
            file.write_text(f"profiling failed: {error_summary(err)}\n")
        self.profiles.append(file.name)
        del sampler
        self.faults.release()

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for preset in self.args.presets:
            config = ECARConfig.preset(preset)
            models = self.models(config)
            for batch in self.args.batches:
                for path in self.args.paths:
                    row = self.run_row(preset, config, batch, path, *models[PATHS[path].dtype])
                    self.rows.append(row)
                    self.write()
                    print(self.describe(row), file=sys.stderr, flush=True)
                    self.faults.stop_if_faulted()
            for batch in self.args.batches:
                for path in PROFILED_PATHS if batch in PROFILED.get(preset, ()) else ():
                    if path in self.args.paths:
                        self.profile(preset, config, batch, path, *models[PATHS[path].dtype])
                        self.write()
            del models
            self.faults.release()
        print(self.markdown())

    # ---- results -----------------------------------------------------------------------------------
    @staticmethod
    def describe(row: Row) -> str:
        if row.error:
            return f"{row.preset} b{row.batch} {row.path}: {row.error}"
        return (f"{row.preset} b{row.batch} {row.path}: {row.latency_s * 1e3:.1f} ms, "
                f"{row.latency_with_decode_s * 1e3:.1f} ms with decode")

    def targets(self) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            if row.path == "graphs" and row.batch in TARGET_SPEEDUP:
                got = speedup(self.rows, row, "latency_s")
                out.append({"what": f"{row.preset} b{row.batch}: graphs vs reference (decode excluded)",
                            "target": f">= {TARGET_SPEEDUP[row.batch]}x", "measured": got,
                            "met": None if got is None else got >= TARGET_SPEEDUP[row.batch]})
            if (row.path, row.preset, row.batch) == ("graphs", TARGET_LATENCY_PRESET, 1):
                got = row.latency_with_decode_s
                out.append({"what": f"{row.preset} b1: graphs latency with VAE decode",
                            "target": f"<= {TARGET_LATENCY_S * 1e3:.0f} ms (H100)", "measured": got,
                            "met": None if got is None else got <= TARGET_LATENCY_S})
        return out

    def markdown(self) -> str:
        def ms(s: float | None) -> str:
            return "-" if s is None else f"{s * 1e3:.1f}"

        def per_s(row: Row, s: float | None) -> str:
            return "-" if s is None else f"{row.batch / s:.1f}"

        def times(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}x"

        table = [[r.preset, r.batch, r.path, ms(r.latency_s), per_s(r, r.latency_s), ms(r.latency_with_decode_s),
                  per_s(r, r.latency_with_decode_s), times(speedup(self.rows, r, "latency_s")),
                  times(speedup(self.rows, r, "latency_with_decode_s")),
                  "-" if r.first_call_s is None else f"{r.first_call_s:.2f}",
                  f"{r.capture_s:.2f} ({r.captures} graphs)" if r.captures else "-",
                  "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.1f}",
                  "-" if r.reserved_bytes is None else f"{r.reserved_bytes / 2**30:.1f}", r.error or ""]
                 for r in self.rows]
        headers = ["preset", "batch", "path", "ms/batch", "img/s", "ms/batch +VAE", "img/s +VAE", "x ref",
                   "x ref +VAE", "first call s", "capture s", "peak GiB", "reserved GiB", "error"]
        lines = [f"Environment: {environment_line(self.env)}.",
                 f"Settings: {self.args.steps} Euler steps per stage, guidance {self.args.cfg_scale}, random weights; "
                 "latency is the median device-synchronized call; +VAE includes the SD-VAE decode; peak GiB is "
                 "max_memory_allocated, which leaves out a replayed graph's activations (its private pool), "
                 "reserved GiB includes them; both include the weights of every path (bf16 and fp32 copies).", "",
                 markdown_table(headers, table), "", "Targets (reported, never asserted):", ""]
        for t in self.targets():
            got = t["measured"]
            shown = "-" if got is None else (f"{got * 1e3:.1f} ms" if "latency" in t["what"] else f"{got:.2f}x")
            verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
            lines.append(f"- {t['what']}: {shown} (target {t['target']}): {verdict}")
        if self.profiles:
            lines += ["", "Profiles (torch.profiler, top ops by self device time): " + ", ".join(self.profiles)]
        return "\n".join(lines)

    def write(self) -> None:
        payload = {"environment": self.env, "settings": {k: v for k, v in vars(self.args).items()},
                   "rows": [dataclasses.asdict(r) for r in self.rows], "targets": self.targets(),
                   "profiles": self.profiles}
        write_outputs(payload, self.markdown(), str(self.out / "bench_graphs.json"),
                      str(self.out / "bench_graphs.md"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_graphs", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/bench_graphs", help="folder for bench_graphs.json, bench_graphs.md "
                        "and the profiles (default: %(default)s)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--presets", nargs="+", default=None, help="default: ecar-xl ecar-b (cpu: ecar-tiny-vae)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 64 8 256 (cpu: 1 2)")
    parser.add_argument("--paths", nargs="+", choices=tuple(PATHS), default=list(PATHS))
    parser.add_argument("--steps", type=int, default=STEPS_PER_STAGE, help="Euler steps per stage")
    parser.add_argument("--cfg-scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row at most")
    parser.add_argument("--row-seconds", type=float, default=3.0, help="stop repeating a row after this much")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.presets = args.presets or (["ecar-tiny-vae"] if cpu else ["ecar-xl", "ecar-b"])
    args.batches = args.batches or ([1, 2] if cpu else [1, 64, 8, 256])
    if not cpu and not torch.cuda.is_available():
        parser.error("CUDA is not available here: this benchmark needs a GPU (--device cpu for a smoke run)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    bench = Bench(parse_args(argv))
    try:
        bench.run()
    except KeyboardInterrupt:  # cut short: what was measured is already written; show it
        print(bench.markdown() + "\n\n(interrupted: the sweep did not finish)")
        return 130
    except DeviceFault as fault:
        print(bench.markdown() + f"\n\n(stopped: the device faulted ({fault}); the later rows were not measured)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
