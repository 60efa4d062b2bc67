"""Throughput in one harness: the E-CAR sampler against diffusers' DiTPipeline with DiT-XL/2.

    python -m benchmarks.throughput --quick                              # CPU: batch 1, a few minutes
    python -m benchmarks.throughput --json OUT.json --markdown OUT.md    # GPU: batch sweep 1, 8, 64, 256

One device, one dtype (bf16 on CUDA, fp32 on the CPU) and the same batch sizes for everything. For
each batch size it times
* the SD-VAE-architecture AutoencoderKL decode alone: one module, random weights, decodes for both;
* each E-CAR preset (random weights) through Sampler.generate at the default settings with guidance
  (20 Euler steps per stage, cfg 4.0, decode included), once per backend choice: automatic dispatch,
  then each registered backend forced first, with CUDA graphs on and off where the sampler has them;
* DiTPipeline with DiT-XL/2 (random weights, DDPMScheduler with 1000 linear-beta training steps,
  guidance 4.0, decode included) at 250 and 50 steps. Where one call would take longer than
  --max-call-s, DiT runs fewer steps and the time is extrapolated linearly in the step count (the
  per-step time is the slope between runs of two step counts); such rows say "extrapolated".
Warm-up calls are excluded: on CUDA they are identical calls (graphs are captured there); on the CPU
they run the same shapes with 1 step per stage (DiT: 1 step). Each row is the median of --repeats
device-synchronized calls (CUDA events on GPU), shown with their range. MFU = counted FLOPs per image
(benchmarks.flops) x images/s / the device's measured matmul peak. The summary and the targets compare
each preset's default path (automatic dispatch, graphs on: what a user gets) with DiT; the fastest
variant is listed beside it.

Order: the VAE rows, the first preset's default path, DiT, the first preset's other variants, the other
presets, and last the --profile call (torch.profiler leaves CUPTI attached after it ends, which slows
later launches: pytorch#144455). Results are rewritten after every row, so a run that is cut short keeps
what it measured; a CUDA error that leaves the device unusable (an illegal address) stops the sweep with
the rows measured so far, rather than recording every later row as the same error.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ecar_infer import ECARConfig, Sampler, keep_freed_memory
from ecar_infer.kernels import chosen_backends, clear_chosen_backends, dispatch, force_backend, ops
from ecar_infer.model import ECARModel
from ecar_infer.sampler import resolve_device, resolve_dtype
from ecar_infer.vae import AutoencoderDecoder, build_decoder, sd_vae_random

from . import flops
from .dit import DIT_NAME, DIT_XL_2, dit_pipeline, dit_xl_2
from .measure import DeviceFault, FaultWatch, PeakMemory, matmul_peak, median, time_call, write_profile
from .report import environment, environment_line, markdown_table, write_outputs

GPU_BATCHES = [1, 8, 64, 256]
VAE_NAME = "SD-VAE decode"
# Issue 5's throughput targets, for one H100 at batch 64 (reported, never asserted).
TARGET_PRESET, TARGET_BATCH, TARGET_SPEEDUP, TARGET_IMAGES_PER_S = "ecar-xl", 64, 25.0, 150.0


@dataclass
class Row:
    model: str
    variant: str
    batch: int
    steps: str
    flops_per_image: float
    times: list[float] = field(default_factory=list)
    latency_s: float | None = None          # per batch: the median call, or its extrapolation
    peak_bytes: int | None = None
    reserved_bytes: int | None = None       # CUDA: graph pools included (measure.PeakMemory)
    backends: dict[str, str] = field(default_factory=dict)
    decode_side: int | None = None          # the side of the latents each call decodes; None: no VAE decode
    note: str = ""
    error: str | None = None
    runs: dict[int, list[float]] = field(default_factory=dict)   # an extrapolation's timed calls, by step count

    @property
    def images_per_s(self) -> float | None:
        return self.batch / self.latency_s if self.latency_s else None


def available_backends() -> list[str]:
    """Every backend registered for at least one hot-path op, in dispatch preference order."""
    op_names = [name for name, fn in vars(ops).items()
                if callable(fn) and getattr(fn, "__module__", None) == ops.__name__]
    found = {backend for op in op_names for backend in dispatch.registered(op)}
    return [name for name in dispatch.BACKEND_NAMES if name in found]


def ecar_variants(device: torch.device, backends: list[str] | None) -> list[tuple[str, bool | None]]:
    """(backend, cuda_graphs) pairs; cuda_graphs is None where the sampler or the device has no graphs.

    The first pair is the default path. On the CPU only automatic dispatch runs unless backends are named
    (the Triton interpreter is a test tool, far too slow to time).
    """
    graphs = device.type == "cuda" and "cuda_graphs" in inspect.signature(Sampler).parameters
    variants: list[tuple[str, bool | None]] = [("auto", True), ("auto", False)] if graphs else [("auto", None)]
    if backends is None:
        backends = available_backends() if device.type == "cuda" else []
    return variants + [(name, True if graphs else None) for name in backends]


def variant_label(backend: str, graphs: bool | None) -> str:
    return backend + ("" if graphs is None else f", graphs {'on' if graphs else 'off'}")


class Harness:
    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        self.faults = FaultWatch(self.device)
        self.cheap_warmup = device.type != "cuda"
        self.peak: dict[str, Any] = {"flops_per_s": 0.0}
        self.update_peak()
        self.rows: list[Row] = []
        self.decode_s: dict[tuple[int, int], float] = {}   # (batch, latent side): the VAE decode's latency
        self.profile_path: str | None = None
        self.env = environment(device)
        self.vae = None
        self.flops_by_preset: dict[str, int] = {}   # counted once (seconds of CPU for ecar-xl) per preset
        self.built: dict[str, tuple[ECARConfig, int, ECARModel, Any]] = {}   # build()'s, once per preset

    # ---- measuring -------------------------------------------------------------------------------
    def update_peak(self) -> None:
        """Measure the matmul peak and keep the highest seen: it is measured at the start of the run and
        again at its end, since on a shared machine the load changes while the sweep runs."""
        peak = matmul_peak(self.device, self.dtype, repeats=10 if self.device.type == "cuda" else 5)
        if peak["flops_per_s"] > self.peak["flops_per_s"]:
            self.peak = peak

    def measure(self, row: Row, call: Callable[[], Any], warmup: Callable[[], Any],
                backend: str = "auto") -> Row:
        """Warm-up, then --repeats timed calls under one peak-memory window; failures become the row's error."""
        try:
            with force_backend(backend):
                for _ in range(self.args.warmup):
                    warmup()
                with PeakMemory(self.device) as memory:
                    row.times = [time_call(call, self.device) for _ in range(self.args.repeats)]
            row.latency_s, row.peak_bytes, row.reserved_bytes = median(row.times), memory.peak_bytes, memory.reserved_bytes
        except Exception as err:  # one failing case (OOM, a kernel that cannot run) must not end the sweep
            row.error = self.faults.row_error(err)
        self.faults.release()
        return row

    def add(self, row: Row) -> None:
        """Keep the row and rewrite the results; then stop the sweep if the device faulted."""
        self.rows.append(row)
        self.write()
        self.faults.stop_if_faulted()

    def shared_vae(self):
        if self.vae is None:
            self.vae = sd_vae_random().to(self.device, self.dtype).eval()
        return self.vae

    # ---- cases -----------------------------------------------------------------------------------
    def vae_decode(self, batch: int, latent_side: int) -> None:
        """The decode alone of `batch` latents of `latent_side` (32 for DiT-XL/2 and the ImageNet presets)."""
        decoder = AutoencoderDecoder(self.shared_vae(), self.shared_vae().config.scaling_factor)
        z = torch.randn(batch, DIT_XL_2["in_channels"], latent_side, latent_side, device=self.device)
        variant = "AutoencoderKL" + ("" if latent_side == DIT_XL_2["sample_size"] else f", {latent_side}x{latent_side}")
        row = Row(VAE_NAME, variant, batch, "-", flops.vae_decode_flops(latent_side))
        warm = functools.partial(decoder.decode, z[:1] if self.cheap_warmup else z)
        self.measure(row, functools.partial(decoder.decode, z), warm)
        if row.latency_s:
            self.decode_s[batch, latent_side] = row.latency_s
        self.add(row)

    def build(self, preset: str) -> tuple[ECARConfig, int, ECARModel, Any]:
        """(config, steps per stage, model, decoder) of 'NAME' or 'NAME@STEPS' (a head variant at its own steps),
        built once per preset: ecar-xl's random initialisation takes about 10 s of CPU, and a preset's rows
        and its profile come in three calls (a GPU session's seconds; the models fit its memory together)."""
        if preset not in self.built:
            name, steps = flops.parse_spec(preset, self.args.steps)
            config = ECARConfig.preset(name)
            model = ECARModel(config).init_weights(self.args.seed, zero_init=False).to(self.device, self.dtype)
            decoder = (AutoencoderDecoder(self.shared_vae(), config.vae_scaling_factor)
                       if config.latent_kind == "sd-vae" else build_decoder(config))
            self.built[preset] = config, steps, model, decoder
        return self.built[preset]

    def generate_call(self, sampler: Sampler, config: ECARConfig, batch: int, steps: int) -> Callable[[], Any]:
        labels = [k % config.num_classes for k in range(batch)]
        return functools.partial(sampler.generate, labels, seed=self.args.seed, cfg_scale=flops.GUIDANCE_SCALE,
                                 steps_per_stage=steps, output_type="pt")

    def ecar(self, preset: str, variants: slice = slice(None)) -> None:
        """The rows of one E-CAR preset: of the variants `variants` selects (ecar_variants' order; the first
        is the default path, which runs at --batches, the others at --variant-batches)."""
        config, steps, model, decoder = self.build(preset)
        if preset not in self.flops_by_preset:
            self.flops_by_preset[preset] = flops.ecar_flops(config, steps)["generator"] + (
                flops.vae_decode_flops(config.latent_size) if config.latent_kind == "sd-vae" else 0)
        per_image = self.flops_by_preset[preset]
        all_variants = ecar_variants(self.device, self.args.backends)
        for backend, graphs in all_variants[variants]:
            default = (backend, graphs) == all_variants[0]
            for batch in self.args.batches if default else self.args.variant_batches:
                options = {} if graphs is None else {"cuda_graphs": graphs}
                sampler = Sampler(model, decoder, progress=False, **options)
                call = self.generate_call(sampler, config, batch, steps)
                warm = functools.partial(call, steps_per_stage=1) if self.cheap_warmup else call
                row = Row(preset, variant_label(backend, graphs), batch, f"{steps} x {config.num_stages} stages",
                          per_image, decode_side=config.latent_size if config.latent_kind == "sd-vae" else None)
                clear_chosen_backends()  # the row names the backends of its own calls only
                self.measure(row, call, warm, backend)
                row.backends = {op: name for op, name in sorted(chosen_backends().items())}
                if sampler.runner.num_failed_captures:  # such units ran eagerly in a row labelled graphs on
                    row.note = f"{sampler.runner.num_failed_captures} unit(s) eager: their graph capture failed"
                del sampler, call, warm  # the partials hold the sampler: free its engines before the next row
                self.faults.release()
                self.add(row)

    def dit(self, pipe, batch: int) -> None:
        """DiT at every requested step count for one batch size; long runs are measured short and extrapolated."""
        per_step = flops.dit_step_flops()["step"]  # per image, guidance included
        decode_flops = flops.vae_decode_flops(DIT_XL_2["sample_size"])
        labels = [k % DIT_XL_2["num_embeds_ada_norm"] for k in range(batch)]

        def call(steps: int) -> Any:
            # to the CPU, as E-CAR's output_type="pt" comes back: both rows include the same image copy
            return pipe(class_labels=labels, guidance_scale=flops.GUIDANCE_SCALE, num_inference_steps=steps,
                        output_type="pt").images.cpu()

        decode = self.decode_s.get((batch, DIT_XL_2["sample_size"]), 0.0)
        try:
            for _ in range(self.args.warmup):
                call(1)
            step_guess = max(time_call(functools.partial(call, 1), self.device) - decode, 1e-6)
        except Exception as err:
            self.add(Row(DIT_NAME, "DDPM, CFG", batch, "-", 0, error=self.faults.row_error(err)))
            return
        measured: Row | None = None
        shorter: Row | None = None   # the second point of an extrapolation
        for steps in sorted(self.args.dit_steps):
            row = Row(DIT_NAME, "DDPM, CFG", batch, str(steps), steps * per_step + decode_flops,
                      decode_side=DIT_XL_2["sample_size"])
            if measured is None or decode + steps * step_guess <= self.args.max_call_s:
                run_steps = max(1, min(steps, int((self.args.max_call_s - decode) / step_guess)))
                measured = self.measure(dataclasses.replace(row, steps=str(run_steps)),
                                        functools.partial(call, run_steps), lambda: None)
            run_steps = int(measured.steps)
            row.times, row.peak_bytes, row.error = measured.times, measured.peak_bytes, measured.error
            row.reserved_bytes, row.latency_s = measured.reserved_bytes, measured.latency_s
            if run_steps != steps and measured.latency_s is not None:
                # the per-step time is the slope between two step counts: every fixed cost of a call (the
                # decode, the pipeline's set-up and copies) cancels, where subtracting the decode row, timed
                # alone at another moment, left any difference multiplied by the steps extrapolated
                other_steps = 1 if run_steps > 1 else 2
                if shorter is None or int(shorter.steps) != other_steps:
                    shorter = self.measure(dataclasses.replace(row, steps=str(other_steps)),
                                           functools.partial(call, other_steps), lambda: None)
                row.error = row.error or shorter.error
                if shorter.latency_s is not None:
                    # at least 0: two noisy timings of nearly equal calls must not make a negative per-step time
                    step_s = max((measured.latency_s - shorter.latency_s) / (run_steps - other_steps), 0.0)
                    row.latency_s = measured.latency_s + (steps - run_steps) * step_s
                    row.runs = {run_steps: measured.times, other_steps: shorter.times}   # both, to check the slope
                    row.note = (f"extrapolated from {min(run_steps, other_steps)}- and "
                                f"{max(run_steps, other_steps)}-step runs: {steps} steps at their per-step slope")
                else:
                    row.latency_s = None
            self.add(row)

    def profile_batch(self) -> int:
        return TARGET_BATCH if TARGET_BATCH in self.args.batches else max(self.args.batches)

    def profile(self, preset: str) -> None:
        """One call of the preset's default path under torch.profiler, after a warm-up call: the ops that take
        the time. Run after every timed row (see the module's docstring)."""
        config, steps, model, decoder = self.build(preset)
        batch = self.profile_batch()
        sampler = Sampler(model, decoder, progress=False)
        call = self.generate_call(sampler, config, batch, steps)
        (functools.partial(call, steps_per_stage=1) if self.cheap_warmup else call)()
        path = Path(self.args.profile) / f"profile-{preset}-b{batch}.txt"
        write_profile(call, self.device, path, row_limit=40)
        self.profile_path = str(path)
        del sampler, call
        self.faults.release()

    # ---- results ---------------------------------------------------------------------------------
    def derived(self, row: Row) -> dict[str, Any]:
        out = {"images_per_s": row.images_per_s, "mfu": None, "images_per_s_without_decode": None}
        if row.images_per_s:
            out["mfu"] = row.flops_per_image * row.images_per_s / self.peak["flops_per_s"]
            decode = self.decode_s.get((row.batch, row.decode_side))
            if decode and row.latency_s > decode:
                out["images_per_s_without_decode"] = row.batch / (row.latency_s - decode)
        return out

    def default_variant(self) -> str:
        return variant_label(*ecar_variants(self.device, [])[0])

    def summary(self) -> list[dict[str, Any]]:
        """Per batch and E-CAR preset: its default path against DiT at each step count, and its fastest variant.
        The default path, not the fastest of several variants against DiT's one configuration, since picking
        the best of several noisy timings biases the ratio upward."""
        out = []
        ecar_models = [m for m in dict.fromkeys(r.model for r in self.rows) if m not in (VAE_NAME, DIT_NAME)]
        for batch in sorted({r.batch for r in self.rows}):
            dit = {r.steps: r for r in self.rows if r.model == DIT_NAME and r.batch == batch and r.images_per_s}
            for model in ecar_models:
                timed = [r for r in self.rows if r.model == model and r.batch == batch and r.images_per_s]
                default = next((r for r in timed if r.variant == self.default_variant()), None)
                if default:
                    fastest = max(timed, key=lambda r: r.images_per_s)
                    out.append({"batch": batch, "model": model, "variant": default.variant,
                                "images_per_s": default.images_per_s,
                                "speedup_vs_dit": {steps: default.images_per_s / r.images_per_s
                                                   for steps, r in dit.items()},
                                "dit_extrapolated": sorted(steps for steps, r in dit.items() if r.note),
                                "fastest": {"variant": fastest.variant, "images_per_s": fastest.images_per_s}})
        return out

    def targets(self, summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Issue 5's targets, set for one H100: on another GPU they are listed with no verdict (met: None)."""
        if self.device.type != "cuda":
            return []
        on_h100 = "H100" in str(self.env.get("device", ""))
        out = []
        for s in summary:
            if s["model"] == TARGET_PRESET and s["batch"] == TARGET_BATCH:
                checks = [("images/s including decode", s["images_per_s"], TARGET_IMAGES_PER_S)]
                if "250" in s["speedup_vs_dit"]:
                    what = "speedup over DiT-XL/2 at 250 steps"
                    if "250" in s["dit_extrapolated"]:
                        what += " (DiT extrapolated from shorter runs)"
                    checks.insert(0, (what, s["speedup_vs_dit"]["250"], TARGET_SPEEDUP))
                out += [{"what": what, "measured": value, "required": need,
                         "met": value >= need if on_h100 else None, "margin": value / need}
                        for what, value, need in checks]
        return out

    def payload(self) -> dict[str, Any]:
        summary = self.summary()
        return {
            "settings": {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                         "repeats": self.args.repeats, "warmup": self.args.warmup,
                         "warmup_kind": "cheap (1 step per stage)" if self.cheap_warmup else "identical calls",
                         "max_call_s": self.args.max_call_s, "memory": PeakMemory(self.device).kind,
                         "ecar": f"{self.args.steps} Euler steps per stage, cfg {flops.GUIDANCE_SCALE}",
                         "dit": f"DDPM (1000 linear-beta training steps), guidance {flops.GUIDANCE_SCALE}"},
            "environment": self.env,
            "peak": self.peak,
            "rows": [{**dataclasses.asdict(r), **self.derived(r)} for r in self.rows],
            "summary": summary,
            "targets": self.targets(summary),
            "profile": self.profile_path,
        }

    def write(self) -> None:
        payload = self.payload()
        write_outputs(payload, render_markdown(payload), self.args.json, self.args.markdown, self.args)


def _num(value: float | None, fmt: str = ".3g") -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else format(value, fmt)


def _memory(value: int | None, reserved: int | None = None) -> str:
    if value is None:
        return "n/a"
    shown = f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"
    return shown if reserved is None else f"{shown} ({_memory(reserved)})"


def _latency(row: dict[str, Any]) -> str:
    """The median, and where it is one of several calls their range: '1.23 (1.2-1.3, n=3)'."""
    times = row["times"]
    if row["latency_s"] is None or len(times) < 2 or row["note"].startswith("extrapolated"):
        return _num(row["latency_s"])
    return f"{_num(row['latency_s'])} ({_num(min(times))}-{_num(max(times))}, n={len(times)})"


def _backends(chosen: dict[str, str]) -> str:
    return "+".join(sorted(set(chosen.values()))) or "-"


def _verdict(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return "n/a: not an H100"
    return "met" if target["met"] else f"MISSED by {1 / target['margin']:.2f}x"


def render_markdown(payload: dict[str, Any]) -> str:
    s, peak = payload["settings"], payload["peak"]
    headers = ["model", "variant", "backends used", "batch", "steps", "latency / batch (s)", "images/s",
               "images/s without decode", "peak memory", "GFLOPs / image", "MFU", "note"]
    rows = []
    for r in sorted(payload["rows"], key=lambda r: r["batch"]):
        note = r["error"] or r["note"]
        rows.append([r["model"], r["variant"], _backends(r["backends"]), r["batch"], r["steps"],
                     _latency(r), _num(r["images_per_s"]), _num(r["images_per_s_without_decode"]),
                     _memory(r["peak_bytes"], r.get("reserved_bytes")), _num(r["flops_per_image"] / 1e9),
                     "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", note])
    parts = [f"Device {payload['environment']['device']}, {s['dtype']}; peak {peak['flops_per_s'] / 1e12:.3g} "
             f"TFLOP/s measured ({peak['how']}; the higher of the run's start and end). E-CAR: {s['ecar']}; {DIT_NAME}: {s['dit']}. Median of "
             f"{s['repeats']} timed calls (their range and count in parentheses) after {s['warmup']} warm-up "
             f"call(s), {s['warmup_kind']}; peak memory: "
             f"{s['memory']}. The latencies of latent models include the VAE decode; \"without decode\" "
             f"subtracts the {VAE_NAME} row of the same batch and latent size.",
             markdown_table(headers, rows)]
    if payload["summary"]:
        steps = sorted({k for x in payload["summary"] for k in x["speedup_vs_dit"]}, key=int, reverse=True)
        parts.append(markdown_table(
            ["batch", "model (default path)", "images/s"] + [f"speedup vs {DIT_NAME}, {k} steps" for k in steps]
            + ["fastest variant (images/s)"],
            [[x["batch"], f"{x['model']} ({x['variant']})", _num(x["images_per_s"])]
             + [_num(x["speedup_vs_dit"][k], ".1f") + "x" + ("*" if k in x["dit_extrapolated"] else "")
                if k in x["speedup_vs_dit"] else "-" for k in steps]
             + [f"{x['fastest']['variant']} ({_num(x['fastest']['images_per_s'])})"]
             for x in payload["summary"]]))
        if any(x["dit_extrapolated"] for x in payload["summary"]):
            parts.append(f"\\* {DIT_NAME} extrapolated from shorter runs (its rows say how).")
    if payload["targets"]:
        parts.append(markdown_table(
            ["target (issue 5, one H100, batch 64)", "required", "measured", "result"],
            [[t["what"], _num(t["required"]), _num(t["measured"]), _verdict(t)] for t in payload["targets"]]))
    if payload["profile"]:
        parts.append(f"Profile of one default-path call, taken after every timed row: `{payload['profile']}`.")
    parts.append(environment_line(payload["environment"]) + ".")
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ecar-b and DiT at batch 1, 2 repeats, DiT runs of at most 30 s (extrapolated)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 elsewhere")
    parser.add_argument("--models", nargs="+", type=flops.preset_spec,
                        help="E-CAR presets, NAME or NAME@STEPS (default: ecar-b ecar-l ecar-xl)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sweep (default: 1 8 64 256 on GPU, 1 on CPU)")
    parser.add_argument("--variant-batches", type=int, nargs="+",
                        help="batches at which the non-default E-CAR variants run (default: --batches)")
    parser.add_argument("--dit-batches", type=int, nargs="+", help="batches at which DiT runs (default: --batches)")
    parser.add_argument("--backends", nargs="+", help="backends to force besides auto (default: all registered, "
                                                      "on GPU; none on the CPU)")
    parser.add_argument("--steps", type=int, default=flops.STEPS_PER_STAGE, help="E-CAR Euler steps per stage")
    parser.add_argument("--dit-steps", type=int, nargs="+", default=list(flops.DIT_STEPS))
    parser.add_argument("--no-dit", action="store_true", help="skip DiT-XL/2")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-call-s", type=float, help="longest DiT call before extrapolating (default 60; quick 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write results as JSON here (rewritten after every row)")
    parser.add_argument("--markdown", help="write the tables as Markdown here (rewritten after every row)")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler table of one default E-CAR call here")
    args = parser.parse_args(argv)
    try:
        gpu = resolve_device(args.device).type == "cuda"
    except ValueError as err:   # no such device here
        parser.error(f"--device: {err}")
    args.models = args.models or (["ecar-b"] if args.quick else list(flops.BASE_PRESETS))
    args.batches = args.batches or ([1] if args.quick or not gpu else GPU_BATCHES)
    args.variant_batches = args.variant_batches or args.batches
    args.dit_batches = [] if args.no_dit else (args.dit_batches or args.batches)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.max_call_s = args.max_call_s or (30.0 if args.quick else 60.0)
    return args


def run_dit(harness: Harness, device: torch.device, batches: Sequence[int]) -> None:
    with torch.device(device):
        transformer = dit_xl_2()
    pipe = dit_pipeline(transformer.to(device, harness.dtype).eval(), harness.shared_vae())
    for batch in batches:
        harness.dit(pipe, batch)
    del pipe, transformer
    harness.faults.release()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as ecar-sample does, for both E-CAR and DiT: ecar_infer/cpu_memory.py
    device = resolve_device(args.device)
    harness = Harness(args, device, resolve_dtype(args.dtype, device))
    configs = [ECARConfig.preset(flops.parse_spec(m, args.steps)[0]) for m in args.models]
    decode_sides = {c.latent_size for c in configs if c.latent_kind == "sd-vae"}   # one decode row per latent size
    if args.dit_batches:
        decode_sides.add(DIT_XL_2["sample_size"])
    for side in sorted(decode_sides):
        for batch in sorted(set(args.batches) | set(args.dit_batches)):
            harness.vae_decode(batch, side)
    stopped = None
    try:
        # DiT right after the first preset's default path: the issue-5 targets compare those two, so when the
        # time runs out (the GPU suite's part is cut at its budget) or a forced backend faults, it is the other
        # variants' and presets' rows that are lost, not DiT's
        first, *others = args.models
        harness.ecar(first, slice(0, 1))
        if args.dit_batches:
            run_dit(harness, device, args.dit_batches)
        harness.ecar(first, slice(1, None))
        for preset in others:
            harness.ecar(preset)
        if args.profile:
            harness.profile(first)
    except KeyboardInterrupt:  # cut short (the GPU suite's `timeout -s INT`): still measure the peak again
        stopped = "interrupted: the sweep did not finish"
    except DeviceFault as fault:
        stopped = f"stopped: the device faulted ({fault}); the later rows were not measured"
    try:
        harness.update_peak()  # the start's measurement may be low (a cold GPU); the MFUs use the higher one
    except Exception:  # an interrupt can leave the device unusable (mid-capture): keep the start's peak
        if not stopped:
            raise
    harness.write()
    print(render_markdown(harness.payload()) + (f"\n\n({stopped})" if stopped else ""))
    return 130 if stopped and stopped.startswith("interrupted") else (1 if stopped else 0)


if __name__ == "__main__":
    sys.exit(main())
