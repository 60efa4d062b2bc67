"""Guidance settings side by side: weight and sigma interval, over several seed sets of the same images.

    python -m benchmarks.guidance --ckpt ecar-digits32 --setting 2:0,1 --setting 2:0.55,0.9 --out guidance.json
    python -m benchmarks.guidance --ckpt ecar-emoji32 --data emoji32.npz --heldout emoji32-heldout.npz \
        --setting 3:0,1 --setting 3.5:0.55,0.9 --out guidance.json

Each --setting is W:LO,HI (guidance weight W where LO <= sigma <= HI; 0,1 is everywhere). Every setting
samples the same seed sets (--seed-sets of --per-class images per class, seeds from 10,000 in steps of
10,000, so at most 10,000 images per set) at the checkpoint's recommended steps per stage (or --steps), so the settings differ only in guidance. The
judge is ecar_infer/training/quality.py's (accuracy of the independent classifier, Frechet distance to
the held-out images, read against the FD of as many real training images, which the report records as
real_fd; the share of samples nearer a training image than the median real nearest-neighbour distance).
Prints one line per setting and seed set, then the means over the seed sets.
"""
from __future__ import annotations

import argparse
import json

import torch

from ecar_infer import Sampler, keep_freed_memory
from ecar_infer.command import interval_spec, positive_int, steps_spec
from ecar_infer.training import quality

from .report import write_outputs

SEED_STEP = 10_000


def setting_spec(text: str) -> tuple[float, tuple[float, float]]:
    weight, _, interval = text.partition(":")
    try:
        return float(weight), interval_spec(interval)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"give W:LO,HI (e.g. 2:0.55,0.9), got {text!r}") from None


def measure(sampler: Sampler, ref: quality.Reference, real_features, cfg: float, interval: tuple[float, float],
            seed: int, per_class: int, steps=None) -> dict:
    images, labels = quality.generate(sampler, per_class, seed, cfg_scale=cfg, cfg_interval=interval,
                                      steps_per_stage=steps)
    return {"cfg": cfg, "interval": list(interval), "seed": seed,
            "accuracy": ref.accuracy(images, labels),
            "fd": quality.frechet_distance(ref.features(images), real_features),
            "memorisation_nearest": quality.memorisation(images, labels, ref, "nearest")}


def summarise(rows: list[dict]) -> list[dict]:
    """Means over the seed sets, one entry per setting, in the order the settings were given."""
    settings = list(dict.fromkeys((r["cfg"], tuple(r["interval"])) for r in rows))
    out = []
    for cfg, interval in settings:
        mine = [r for r in rows if (r["cfg"], tuple(r["interval"])) == (cfg, interval)]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("accuracy", "fd", "memorisation_nearest")}
        out.append({"cfg": cfg, "interval": list(interval), "seed_sets": len(mine), **mean,
                    "fd_range": [min(r["fd"] for r in mine), max(r["fd"] for r in mine)],
                    "accuracy_range": [min(r["accuracy"] for r in mine), max(r["accuracy"] for r in mine)]})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guidance", description=__doc__.split("\n\n")[0])
    quality.add_judge_arguments(parser, ckpt_required=True)
    parser.add_argument("--setting", type=setting_spec, action="append", required=True, metavar="W:LO,HI")
    parser.add_argument("--steps", type=steps_spec, metavar="N|a,b,c",
                        help="steps per stage (default: the checkpoint's recommended)")
    parser.add_argument("--seed-sets", type=positive_int, default=5)
    parser.add_argument("--per-class", type=positive_int, default=100)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", help="JSON report")
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    sampler = quality.judged_model(parser, args)
    per_set = sampler.config.num_classes * args.per_class
    if per_set > SEED_STEP:  # set k takes seeds k*SEED_STEP + 0 .. per_set-1: more would reach the next set's
        parser.error(f"a seed set of {per_set} images ({sampler.config.num_classes} classes x --per-class "
                     f"{args.per_class}) would overlap the next (sets start {SEED_STEP} seeds apart): give "
                     f"--per-class {SEED_STEP // sampler.config.num_classes} or less")
    ref = quality.judge_of_data(parser, args, sampler) or quality.build_reference()
    real_features = ref.features(ref.heldout)
    rows = []
    for k in range(1, args.seed_sets + 1):
        for cfg, interval in args.setting:
            rows.append(measure(sampler, ref, real_features, cfg, interval, k * SEED_STEP, args.per_class, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    steps = sampler.defaults.steps_per_stage if args.steps is None else args.steps
    real_fd, real_images = ref.real_fd(per_set)
    report = {"ckpt": str(args.ckpt), "data": args.data, "per_class": args.per_class,
              "steps_per_stage": steps, "threads": args.threads, "real_fd": real_fd, "real_fd_images": real_images,
              "torch": torch.__version__, "rows": rows, "summary": summarise(rows)}
    print(f"real images: FD {real_fd:.3f} of {real_images} training images against the held-out images")
    for s in report["summary"]:
        print(f"guidance {s['cfg']:g} on sigma {s['interval'][0]:g}-{s['interval'][1]:g}: accuracy "
              f"{100 * s['accuracy']:.2f}%, FD {s['fd']:.3f} ({s['fd_range'][0]:.3f}-{s['fd_range'][1]:.3f}), "
              f"nearest-neighbour share {s['memorisation_nearest']:.3f} over {s['seed_sets']} seed sets")
    write_outputs(report, "", args.out, None, args)


if __name__ == "__main__":
    main()
