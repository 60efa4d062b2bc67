"""FLOPs per image: E-CAR presets against DiT-XL/2, and the staged (KV-cache) sampler against a naive loop.

    python -m benchmarks.flops [--presets ecar-b ecar-xl ecar-xl-attn-sc@2 ...] [--cfg-interval LO,HI]
        [--json PATH] [--markdown PATH]

A preset may carry its own steps per stage as NAME@STEPS (the head variants' few-step sampling); others
take --steps. The defaults include ecar-xl-attn@2: the head kind of the shipped digits model, at its 2
steps per stage.

Counted with torch.utils.flop_counter.FlopCounterMode while the models run on the meta device (shapes
only: no memory, no arithmetic, so it runs anywhere in seconds). FLOPs = 2 x multiply-accumulates of
matmuls, convolutions and attention, which is what the counter counts; norms and elementwise ops are
not counted. DiT's published "Gflops" are MACs: its 118.6 is about 237 GFLOPs here.

E-CAR is counted by running the sampler's own engine units (ecar_infer.engine.StageEngine) at the
default settings with guidance: the AR transformer (begin + every stage over the KV cache) and the
flow head (every Euler step of every stage), both on the doubled batch that guidance needs (with
--cfg-interval, only where the engine runs the null branch). DiT-XL/2
is one DiTTransformer2DModel forward on the doubled batch, times the number of DDPM steps. Both decode
one 32x32x4 latent with the SD-VAE-architecture AutoencoderKL, counted once and shown separately.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from ecar_infer import ECARConfig
from ecar_infer.command import interval_spec
from ecar_infer.engine import StageEngine
from ecar_infer.kernels import force_backend
from ecar_infer.model import ECARModel
from ecar_infer.noise import draw_noise
from ecar_infer.schedule import plan_for
from ecar_infer.vae import SD_VAE_ARCHITECTURE

from .dit import DIT_NAME, DIT_XL_2, dit_xl_2
from .report import environment, environment_line, markdown_table, write_outputs

BASE_PRESETS = ("ecar-b", "ecar-l", "ecar-xl")
# the flow heads at the default 20 Euler steps; the shortcut heads (docs/MODEL.md, "Head variants") at 1-4;
# the attention/flow head at the 2 Euler steps the shipped digits model samples with
PRESETS = BASE_PRESETS + ("ecar-xl-attn", "ecar-xl-sc@2", "ecar-xl-attn-sc@4", "ecar-xl-attn-sc@2", "ecar-xl-attn-sc@1",
                          "ecar-xl-attn@2")
STEPS_PER_STAGE = 20
GUIDANCE_SCALE = 4.0
DIT_STEPS = (250, 50)
# (row, DiT steps, required DiT / E-CAR generator ratio), reported, never asserted. Issue 5: ecar-xl at most
# 1/10 of DiT-XL/2 at 50 steps and 1/40 at 250. Issue 13: with the chosen head, 1/150 at 250 (checked for the
# shortcut heads at 2 steps and for attention/flow at 2 steps, the shipped models' head kinds).
TARGETS = (("ecar-xl", 50, 10.0), ("ecar-xl", 250, 40.0), ("ecar-xl-attn-sc@2", 250, 150.0),
           ("ecar-xl-sc@2", 250, 150.0), ("ecar-xl-attn@2", 250, 150.0))
GIGA = 1e9
T = TypeVar("T")


def parse_spec(spec: str, default_steps: int) -> tuple[str, int]:
    """'NAME' or 'NAME@STEPS' -> (preset name, steps per stage)."""
    name, _, steps = spec.partition("@")
    return name, int(steps) if steps else default_steps


def preset_spec(text: str) -> str:
    """An argparse type: 'NAME' or 'NAME@STEPS' of a preset that exists and a positive step count."""
    from ecar_infer.registry import preset_names

    name, _, steps = text.partition("@")
    if name not in preset_names():
        raise argparse.ArgumentTypeError(f"no preset {name!r}; the presets are {', '.join(preset_names())}")
    if steps and not (steps.isdecimal() and int(steps) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME or NAME@STEPS with STEPS a positive integer")
    return text


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of fn, as torch.utils.flop_counter counts them. Runs under no_grad with the
    reference kernels, so the count does not depend on which backends are installed."""
    with torch.no_grad(), force_backend("reference"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def on_meta(build: Callable[[], T]) -> T:
    """build() with every tensor it creates on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build()


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ecar_flops(config: ECARConfig, steps_per_stage: int = STEPS_PER_STAGE, cfg_scale: float = GUIDANCE_SCALE,
               cfg_interval: tuple[float, float] | None = None) -> dict[str, int]:
    """Per-image FLOPs of the staged sampler, counted unit by unit as the sampler runs them.

    ar: begin (the AdaLN modulations) and every AR stage; head: every flow stage; generator: every
    unit, the re-noise jumps between stages included (elementwise, so they count 0). With cfg_interval the
    engine skips the null branch where a whole stage is unguided, and in the AR transformer after the last
    guided stage, so those units count less.
    """
    steps = plan_for(config, steps_per_stage, cfg_scale, cfg_interval=cfg_interval)
    model = on_meta(lambda: ECARModel(config))
    engine = StageEngine(model, 1, steps)
    engine.load(torch.zeros(1, dtype=torch.long), draw_noise([0], model.plan))
    by_kind = {"begin": 0, "ar": 0, "flow": 0, "jump": 0}
    for kind, _, unit in engine.units():
        by_kind[kind] += count_flops(unit)
    return {"params": param_count(model), "ar": by_kind["begin"] + by_kind["ar"], "head": by_kind["flow"],
            "generator": sum(by_kind.values())}


def naive_ar_flops(config: ECARConfig, guided: bool | Sequence[bool] = True) -> int:
    """Per-image AR FLOPs without the KV cache: at every stage s, forward_full over stages 0..s, on both
    branches where stage s has a guided step (guided: one flag for every stage, or one per stage)."""
    model = on_meta(lambda: ECARModel(config))
    per_stage = [guided] * config.num_stages if isinstance(guided, bool) else list(guided)

    def prefix(stage: int, rows: int) -> Callable[[], Any]:
        labels = torch.zeros(rows, dtype=torch.long, device="meta")
        ups = [torch.zeros(rows, config.latent_channels, side, side, device="meta")
               for side in model.plan.latent_sides[1:stage + 1]]
        return lambda: model.forward_full(labels, ups)

    return sum(count_flops(prefix(s, 2 if g else 1)) for s, g in enumerate(per_stage))


@functools.lru_cache(maxsize=None)
def vae_decode_flops(latent_side: int) -> int:
    """FLOPs of decoding one latent with the SD-VAE-architecture AutoencoderKL."""
    from diffusers import AutoencoderKL

    vae = on_meta(lambda: AutoencoderKL(**SD_VAE_ARCHITECTURE))
    z = torch.zeros(1, SD_VAE_ARCHITECTURE["latent_channels"], latent_side, latent_side, device="meta")
    return count_flops(lambda: vae.decode(z))


@functools.lru_cache(maxsize=None)
def dit_step_flops(guided: bool = True) -> dict[str, int]:
    """Per-image FLOPs of one DiT-XL/2 sampling step (one forward; on the doubled batch with guidance)."""
    rows = 2 if guided else 1
    side, channels = DIT_XL_2["sample_size"], DIT_XL_2["in_channels"]
    dit = on_meta(dit_xl_2)
    x = torch.zeros(rows, channels, side, side, device="meta")
    ids = torch.zeros(rows, dtype=torch.long, device="meta")
    return {"params": param_count(dit), "step": count_flops(lambda: dit(x, timestep=ids, class_labels=ids))}


def build_report(presets: Sequence[str] = PRESETS, steps_per_stage: int = STEPS_PER_STAGE,
                 cfg_scale: float = GUIDANCE_SCALE, dit_steps: Sequence[int] = DIT_STEPS,
                 cfg_interval: tuple[float, float] | None = None) -> dict[str, Any]:
    guided = cfg_scale != 1.0
    dit = dit_step_flops(guided)
    dit_decode = vae_decode_flops(DIT_XL_2["sample_size"])
    dit_rows = [{"steps": n, "generator": n * dit["step"], "vae_decode": dit_decode} for n in dit_steps]
    ecar_rows = []
    for spec in presets:
        name, steps = parse_spec(spec, steps_per_stage)
        config = ECARConfig.preset(name)
        row = {"preset": spec, "stages": config.num_stages, "steps": steps,
               "head_variant": f"{config.head_kind} {config.head_objective}",
               **ecar_flops(config, steps, cfg_scale, cfg_interval)}
        # the naive loop too runs the null branch only at stages with a guided step (an interval may leave some out)
        plan = plan_for(config, steps, cfg_scale, cfg_interval=cfg_interval)
        row["naive_ar"] = naive_ar_flops(config, [any(stage.guided) for stage in plan])
        row["naive_generator"] = row["generator"] - row["ar"] + row["naive_ar"]  # the head is the same
        row["vae_decode"] = vae_decode_flops(config.latent_size) if config.latent_kind == "sd-vae" else 0
        row["dit_ratio"] = {n: d["generator"] / row["generator"] for n, d in zip(dit_steps, dit_rows)}
        ecar_rows.append(row)
    return {
        "settings": {"units": "FLOPs per image, 2 x multiply-accumulates", "ecar_steps_per_stage": steps_per_stage,
                     "cfg_scale": cfg_scale, "cfg_interval": cfg_interval, "guided": guided,
                     "guidance": guidance_text(cfg_scale, cfg_interval)},
        "environment": environment(torch.device("meta")),
        "dit": {"name": DIT_NAME, "params": dit["params"], "step": dit["step"],
                "gmac_per_forward": dit["step"] / (2 if guided else 1) / 2 / GIGA, "runs": dit_rows},
        "ecar": ecar_rows,
        "targets": targets(ecar_rows),
    }


def guidance_text(cfg_scale: float, cfg_interval: tuple[float, float] | None) -> str:
    if cfg_scale == 1:  # weight 1 is the conditional prediction: no null branch is run or counted
        return "no guidance: the conditional branch alone on both sides"
    if cfg_interval is None:
        return "both branches at every step (2x batch) on both sides"
    lo, hi = cfg_interval
    return (f"E-CAR guided only where {lo:g} <= sigma <= {hi:g} (both branches there, the conditional branch "
            f"alone elsewhere), {DIT_NAME} on both branches at every step")


def targets(ecar_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The FLOPs targets against what was counted (those whose row or DiT step count is absent are left out)."""
    out = []
    for row in ecar_rows:
        for preset, steps, required in TARGETS:
            if row["preset"] == preset and steps in row["dit_ratio"]:
                ratio = row["dit_ratio"][steps]
                out.append({"preset": preset, "dit_steps": steps, "required_ratio": required,
                            "ratio": ratio, "met": ratio >= required, "margin": ratio / required})
    return out


def _g(flops: float) -> str:
    return f"{flops / GIGA:,.1f}"


def _target_text(t: dict[str, Any]) -> str:
    share, limit = 100 / t["ratio"], 100 / t["required_ratio"]
    verdict = "met" if t["met"] else "MISSED"
    how = (f"{t['margin']:.2f}x better than required" if t["met"]
           else f"needs {1 / t['margin']:.2f}x fewer generator FLOPs")
    return f"{verdict}: {share:.2f}% of DiT's (limit {limit:.1f}%), {how}"


def render_markdown(report: dict[str, Any]) -> str:
    dit = report["dit"]
    dit_steps = [r["steps"] for r in dit["runs"]]
    ratio_headers = [f"{DIT_NAME} generator / this, {n} steps" for n in dit_steps]
    headers = ["model", "head", "params", "sampling", "AR transformer", "flow head", "generator", "VAE decode",
               "generator + decode"] + ratio_headers
    cfg = ", CFG" if report["settings"]["guided"] else ""
    rows = []
    for r in report["ecar"]:
        rows.append([r["preset"], r["head_variant"], f"{r['params'] / 1e6:.0f}M",
                     f"{r['steps']} {'shortcut' if 'shortcut' in r['head_variant'] else 'Euler'} "
                     f"step{'s' if r['steps'] > 1 else ''} x {r['stages']} stages{cfg}",
                     _g(r["ar"]), _g(r["head"]), _g(r["generator"]), _g(r["vae_decode"]),
                     _g(r["generator"] + r["vae_decode"])] + [f"{r['dit_ratio'][n]:.1f}x" for n in dit_steps])
    for d in dit["runs"]:
        rows.append([DIT_NAME, "-", f"{dit['params'] / 1e6:.0f}M", f"{d['steps']} DDPM steps{cfg}", "-", "-",
                     _g(d["generator"]), _g(d["vae_decode"]), _g(d["generator"] + d["vae_decode"])]
                    + ["-"] * len(dit_steps))
    parts = [f"FLOPs per image in GFLOPs (2 x multiply-accumulates; {report['settings']['guidance']}).",
             markdown_table(headers, rows),
             f"{DIT_NAME} forward, one image: {dit['gmac_per_forward']:.2f} GMAC (the DiT paper's 118.6 \"Gflops\" "
             "are MACs)."]
    if report["targets"]:
        parts.append(markdown_table(
            ["target", "counted ratio", "result"],
            [[f"{t['preset']} generator <= 1/{t['required_ratio']:.0f} of {DIT_NAME} at {t['dit_steps']} steps",
              f"{t['ratio']:.2f}x", _target_text(t)] for t in report["targets"]]))
    parts.append("Staged sampler (AR transformer once per stage over the KV cache) against a naive loop that "
                 "re-runs forward_full over all tokens so far at every stage; the flow head is the same in both.")
    parts.append(markdown_table(
        ["model", "AR staged", "AR naive", "naive / staged (AR)", "generator staged", "generator naive",
         "naive / staged (generator)"],
        [[r["preset"], _g(r["ar"]), _g(r["naive_ar"]), f"{r['naive_ar'] / r['ar']:.2f}x", _g(r["generator"]),
          _g(r["naive_generator"]), f"{r['naive_generator'] / r['generator']:.2f}x"] for r in report["ecar"]]))
    parts.append(f"Counted on the meta device; {environment_line(report['environment'])}.")
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", type=preset_spec, default=list(PRESETS))
    parser.add_argument("--steps", type=int, default=STEPS_PER_STAGE,
                        help="E-CAR steps per stage for presets without their own @STEPS")
    parser.add_argument("--cfg-scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--cfg-interval", type=interval_spec, metavar="LO,HI",
                        help="E-CAR guided only where LO <= sigma <= HI (default: everywhere; DiT always everywhere)")
    parser.add_argument("--dit-steps", type=int, nargs="+", default=list(DIT_STEPS))
    parser.add_argument("--json", help="write the counts as JSON here")
    parser.add_argument("--markdown", help="write the tables as Markdown here")
    args = parser.parse_args(argv)
    report = build_report(args.presets, args.steps, args.cfg_scale, args.dit_steps, args.cfg_interval)
    markdown = render_markdown(report)
    write_outputs(report, markdown, args.json, args.markdown, args)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
