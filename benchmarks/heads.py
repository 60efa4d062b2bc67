"""Head variants of digits32 models side by side: quality and CPU cost at several step counts, with and
without guidance (issue 13's table; docs/MODEL.md, "Head variants").

    python -m benchmarks.heads --ckpt runs/a/ema.safetensors --ckpt runs/b/ema.safetensors \
        --steps 1,2,4,10 --cfg 1,4 --per-class 50 --out heads.json

For every checkpoint and setting: the independent classifier's accuracy on the samples (PCA + RBF SVM fit
on the real digits32 train split, ecar_infer/training/quality.py), the Frechet distance in its feature
space against the held-out real images (read against the FD of as many real training images, which the
report records), the mean distance from a sample to its nearest image of the whole training split
(pixels in [-1, 1]; real held-out images give the reference value), speckle (isolated foreground pixels
per image), the head evaluations per image (one
evaluation runs the head on every token of a stage, per guidance branch), and the wall time to sample 64
images (one warm-up, then the median of --repeats); a row also records the checkpoint's training steps
where its metadata has them. Guided rows use each checkpoint's recommended guidance
interval unless --cfg-interval is given, and record it. A shortcut model takes only powers of two: a step
count that is not one is replaced by the largest power of two below it, and the row says so.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.heads_table import render_table
from benchmarks.report import environment, write_outputs
from ecar_infer import CheckpointError, Sampler, keep_freed_memory
from ecar_infer.checkpoint import read_checkpoint_header
from ecar_infer.command import interval_spec
from ecar_infer.schedule import StageSteps
from ecar_infer.training.digits import NUM_CLASSES
from ecar_infer.training.quality import build_reference, flat, frechet_distance, generate, nearest_distances
from ecar_infer.weights import checkpoint_path


def isolated_pixels(images: np.ndarray) -> float:
    """Speckle: foreground pixels (brighter than mid-grey) none of whose 8 neighbours is foreground, per image."""
    side = math.isqrt(images[0].size)          # [N, 1, H, W] or flattened [N, H*W] grayscale
    fg = images.reshape(len(images), side, side) > 0
    padded = np.pad(fg, ((0, 0), (1, 1), (1, 1)))
    h, w = fg.shape[1:]
    neighbours = sum(padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    return float((fg & (neighbours == 0)).sum() / len(images))


def head_evaluations(plan: list[StageSteps]) -> int:
    """Head evaluations per image of one request: every step of every stage, once per guidance branch."""
    return sum(2 if guided else 1 for st in plan for guided in st.guided)


def usable_steps(sampler: Sampler, steps: int) -> int:
    if not sampler.config.shortcut:
        return steps
    return 1 << (steps.bit_length() - 1)


def time_64(sampler: Sampler, repeats: int, **settings) -> float:
    labels = [k % NUM_CLASSES for k in range(64)]
    run = lambda: sampler.generate(labels, seed=0, output_type="np", progress=False, **settings)  # noqa: E731
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_steps(sampler: Sampler) -> dict[str, int]:
    """{"training_steps": N} from the checkpoint's metadata (ecar-train writes it; a re-issued file may say
    the total over several legs), else {}: the "training steps" column of benchmarks/heads_table.py."""
    value = getattr(sampler.model, "checkpoint_metadata", {}).get("training_steps")
    return {"training_steps": int(value)} if value and value.isdigit() else {}


def nearest_train_distance(images: np.ndarray, train: np.ndarray) -> float:
    """Mean over images of the distance to the closest training image."""
    return float(nearest_distances(flat(images), train).mean())


def numbers(parser: argparse.ArgumentParser, option: str, text: str, kind: type) -> list:
    """A comma-separated list of positive numbers, or the parser's usage error."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        parser.error(f"{option} {text}: give positive numbers separated by commas, e.g. {option} 1,2")
    return values


def digits32_sampler(parser: argparse.ArgumentParser, ckpt: str) -> Sampler:
    """The checkpoint's CPU sampler, or the parser's usage error where it cannot be read or is not a model of
    digits32's images (the reference classifier judges 32x32 grayscale digits of 10 classes)."""
    try:   # the header first: a latent model would want its VAE before it could be refused
        c, _ = read_checkpoint_header(checkpoint_path(ckpt))
    except CheckpointError as err:
        parser.error(str(err))
    if (c.latent_kind, c.latent_channels, c.image_size, c.num_classes) != ("pixel", 1, 32, NUM_CLASSES):
        parser.error(f"--ckpt {ckpt}: a {c.latent_kind} model of {c.image_size}x{c.image_size} images with "
                     f"{c.latent_channels} channel(s) and {c.num_classes} classes; this table judges digits32 "
                     f"models (pixel, 32x32, 1 channel, {NUM_CLASSES} classes)")
    try:
        return Sampler.from_pretrained(ckpt, device="cpu", progress=False)
    except CheckpointError as err:   # a header that reads over tensors that do not
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", default=[], help="checkpoint (repeatable)")
    parser.add_argument("--render", metavar="JSON", help="only print the Markdown table of a saved report")
    parser.add_argument("--steps", default="1,2,4,10", help="steps per stage, comma separated")
    parser.add_argument("--cfg", default="1,4", help="guidance scales, comma separated")
    parser.add_argument("--cfg-interval", type=interval_spec, metavar="LO,HI",
                        help="guide only where LO <= sigma <= HI (default: each checkpoint's recommended; "
                             "0,1: everywhere)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of 64 images per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON results (the Markdown table goes to stdout)")
    args = parser.parse_args(argv)
    if args.render:
        print(render_table([(args.render, json.loads(Path(args.render).read_text()))]))
        return
    if not args.ckpt or not args.out:
        parser.error("give --ckpt (one or more) and --out, or --render JSON")
    step_counts, scales = numbers(parser, "--steps", args.steps, int), numbers(parser, "--cfg", args.cfg, float)
    # every checkpoint loaded and checked before the reference classifier is fit (most of a minute)
    samplers = {ckpt: digits32_sampler(parser, ckpt) for ckpt in args.ckpt}
    keep_freed_memory()  # as ecar-sample does: times are what the command line gets
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))   # date, CPU, threads and load, before any measurement
    ref = build_reference()
    real_features = ref.features(ref.heldout)
    real_nearest = nearest_train_distance(ref.heldout[:NUM_CLASSES * args.per_class], ref.train)
    real_fd, _ = ref.real_fd(NUM_CLASSES * args.per_class)   # the FD floor at the rows' sample count
    rows = []
    for ckpt, sampler in samplers.items():
        cfg_model = sampler.config
        name = f"{cfg_model.head_kind}/{cfg_model.head_objective}"
        for steps in step_counts:
            used = usable_steps(sampler, steps)
            for cfg in scales:
                settings = dict(cfg_scale=cfg, steps_per_stage=used, cfg_interval=args.cfg_interval)
                images, labels = generate(sampler, args.per_class, args.seed, **settings)
                interval = sampler.defaults.guidance_interval(args.cfg_interval)
                row = {"ckpt": ckpt, "head": name, "params": sum(p.numel() for p in sampler.model.parameters()),
                       "steps": used, "asked_steps": steps, "cfg": cfg,
                       "cfg_interval": list(interval) if cfg != 1.0 and interval else None,
                       "accuracy": ref.accuracy(images, labels),
                       "fd": frechet_distance(ref.features(images), real_features),
                       "nearest_train": nearest_train_distance(images, ref.train),
                       "isolated_pixels": isolated_pixels(images),
                       "head_evals_per_image": head_evaluations(sampler.plan(**settings)),
                       "seconds_64": time_64(sampler, args.repeats, **settings), **training_steps(sampler)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"environment": env, "rows": rows,
              "real_heldout_accuracy": ref.accuracy(ref.heldout, ref.heldout_labels),
              "real_nearest_train": real_nearest, "real_fd": real_fd,
              "real_isolated_pixels": isolated_pixels(ref.heldout),
              "threads": args.threads, "per_class": args.per_class, "seed": args.seed, "repeats": args.repeats,
              "torch": torch.__version__}
    write_outputs(report, "", args.out, None, args)
    print(render_table([(args.out, report)]))


if __name__ == "__main__":
    main()
