"""Editing quality of a class-conditional pixel model (docs/BENCHMARKS.md, "Editing"), judged like
quality.py: the independent classifier (PCA + RBF SVM fit on real training images) and real held-out
images of its data set (digits32, or any ecar-train data source with a held-out split).

    python -m ecar_infer.training.edit_quality [--ckpt ...] [--per-class 10] [--vary-images 8] \
        [--json edit.json] [--pictures docs/] [--skip-cost]
    python -m ecar_infer.training.edit_quality --ckpt emoji.safetensors --data emoji32.npz \
        --heldout emoji32-heldout.npz [...]

measures, at the checkpoint's recommended settings and without guidance, on the first --per-class
held-out images of each class (fewer where a class has fewer), taken in turns over the classes (the
first of class 0, 1, ..., then the second of each; for digits32 the first held-out images in order):
* kept pixels: how many kept pixels of the outputs differ from the input (pixel models: none);
* completion: the classifier's accuracy on held-out images whose top, bottom, left or right half was
  regenerated conditioned on the true class, next to the same images with that half mid-grey, and the
  untouched images;
* seams: the mean absolute difference between the two pixel rows (columns) on either side of the mask
  boundary, for the completed, the grey-filled and the real images, and at the same place in plain
  samples of the same classes (the model's own roughness, with no boundary);
* vary from each stage: PSNR against the original of the outputs average-pooled to each stage's
  resolution (what survives), and the mean pairwise L2 distance among the variations of one image (what
  varies), with the classifier's accuracy;
* cost: seconds per image of editing against plain sampling at batch 32 on this machine's CPU.
With --pictures it writes edit-inpaint.png and edit-vary.png there (edit-inpaint-NAME.png and
edit-vary-NAME.png for --data NAME.npz or a folder NAME).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from .data import DIGITS32
from .quality import (CLASSIFIER_TRAIN_SIZE, add_judge_arguments, build_reference, flat, judge_of_data, judged_model,
                      off_diagonal, pairwise_distances)

HALVES = ("top", "bottom", "left", "right")
GREY = 0.0  # mid-grey in [-1, 1]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (what a user's PNGs hold), as the sampler converts."""
    import torch

    from ..output import to_uint8 as tensor_to_uint8

    return tensor_to_uint8(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N, C, H, W] float in [-1, 1]."""
    return images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def pick(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first per_class images of each class, taken in turns over the classes: class 0's
    first, class 1's first, ..., then the second of each (a class with fewer images drops out)."""
    rank = np.zeros(len(labels), dtype=int)   # the image's place among its class's images
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    chosen = np.flatnonzero(rank < per_class)
    return chosen[np.lexsort((labels[chosen], rank[chosen]))]


def seam(images: np.ndarray, half: str) -> float:
    """Mean |difference| across the boundary of the half (the pixel lines on either side of the middle)."""
    mid = images.shape[-1] // 2
    if half in ("left", "right"):
        return float(np.abs(images[..., :, mid] - images[..., :, mid - 1]).mean())
    return float(np.abs(images[..., mid, :] - images[..., mid - 1, :]).mean())


def avg_pool(images: np.ndarray, factor: int) -> np.ndarray:
    n, c, h, w = images.shape
    return images.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-12))))


def completion(sampler, ref, images: np.ndarray, labels: np.ndarray, cfg: float, seed: int) -> dict:
    from ..editing import region_mask

    size = images.shape[-1]
    plain = to_unit(sampler.generate(labels.tolist(), seed=seed, cfg_scale=cfg, output_type="np",
                                     progress=False).images)
    rows = {"real": {"accuracy": ref.accuracy(images, labels)},
            "generated": {"accuracy": ref.accuracy(plain, labels)}}
    for half in HALVES:
        keep = region_mask(half, size, "inpaint").numpy()
        out = sampler.edit(to_uint8(images), labels.tolist(), mask=half, seed=seed, cfg_scale=cfg,
                           output_type="np", progress=False)
        edited = to_unit(out.images)
        grey = np.where(keep, images, GREY)
        changed = int((out.images != to_uint8(images)).any(-1)[:, keep].sum())   # pixels, any channel
        rows[half] = {"accuracy": ref.accuracy(edited, labels), "accuracy_grey": ref.accuracy(grey, labels),
                      "seam": seam(edited, half), "seam_real": seam(images, half), "seam_grey": seam(grey, half),
                      "seam_generated": seam(plain, half),
                      "kept_pixels_changed": changed, "kept_pixels": int(keep.sum()) * len(images),
                      "edits": edited}
    return rows


def variations(sampler, ref, images: np.ndarray, labels: np.ndarray, count: int, seed: int) -> dict:
    plan = sampler.model.plan
    size = images.shape[-1]
    rows = {}
    for k in range(plan.num_stages):
        pooled_psnr = {}
        outs = []
        for i, (image, label) in enumerate(zip(images, labels)):
            out = sampler.edit(to_uint8(image[None]), [int(label)] * count, mode="vary", from_stage=k,
                               seed=seed + 1000 * i, output_type="np", progress=False)
            outs.append(to_unit(out.images))
        outs = np.stack(outs)                                   # [M, count, C, H, W]
        for s, side in enumerate(plan.latent_sides):
            factor = size // side
            got = avg_pool(outs.reshape(-1, *outs.shape[2:]), factor)
            want = avg_pool(np.repeat(images, count, axis=0), factor)
            pooled_psnr[f"stage{s}_{side}px"] = psnr(got, want)
        spread = [float(off_diagonal(pairwise_distances(flat(v), flat(v))).mean()) for v in outs]
        rows[f"from_stage_{k}"] = {"psnr": pooled_psnr, "pairwise_l2": float(np.mean(spread)),
                                   "accuracy": ref.accuracy(outs.reshape(-1, *outs.shape[2:]),
                                                            np.repeat(labels, count)),
                                   "outs": outs}
    return rows


def cost(sampler, images: np.ndarray, labels: np.ndarray, repeats: int = 5) -> dict:
    """Median seconds per image at batch len(labels): generate, inpaint (a half), vary from stages 1 and 2.
    The runs take turns (round robin), so a change in the machine's load hits all of them alike."""
    runs = {"generate": lambda: sampler.generate(labels.tolist(), seed=0, output_type="np", progress=False),
            "inpaint (left half)": lambda: sampler.edit(to_uint8(images), labels.tolist(), mask="left", seed=0,
                                                        output_type="np", progress=False),
            "vary from stage 1": lambda: sampler.edit(to_uint8(images), labels.tolist(), mode="vary", from_stage=1,
                                                      seed=0, output_type="np", progress=False),
            "vary from stage 2": lambda: sampler.edit(to_uint8(images), labels.tolist(), mode="vary", from_stage=2,
                                                      seed=0, output_type="np", progress=False)}
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) / len(labels) for name, t in times.items()}


def pictures(folder: str, images: np.ndarray, completed: dict, varied: dict, rows: int = 6,
             name: str = "") -> None:
    """edit-inpaint{name}.png: per row a held-out image, then for each half its grey-masked input and
    completion. edit-vary{name}.png: per row an image, then 8 variations from stage 1 (and a row from
    stage 2 below it)."""
    from ..editing import region_mask
    from ..output import make_grid, save_image

    def big(a: np.ndarray) -> np.ndarray:  # [C, H, W] in [-1, 1] -> uint8 [2H, 2W, C]
        return to_uint8(a[None])[0].repeat(2, 0).repeat(2, 1)

    size = images.shape[-1]
    cells = []
    for i in range(min(rows, len(images))):
        cells.append(big(images[i]))
        for half in HALVES:
            keep = region_mask(half, size, "inpaint").numpy()
            cells += [big(np.where(keep, images[i], GREY)), big(completed[half]["edits"][i])]
    save_image(make_grid(np.stack(cells), columns=1 + 2 * len(HALVES)),
               os.path.join(folder, f"edit-inpaint{name}.png"))
    cells = []
    for i in range(min(rows // 2, len(varied["from_stage_1"]["outs"]))):
        for k in (1, 2):
            outs = varied[f"from_stage_{k}"]["outs"][i]
            cells += [big(images[i])] + [big(o) for o in outs[:8]]
    save_image(make_grid(np.stack(cells), columns=9), os.path.join(folder, f"edit-vary{name}.png"))


def main(argv: list[str] | None = None) -> None:
    from ..command import positive_int, seed_int
    from ..cpu_memory import keep_freed_memory
    from ..editing import image_channels

    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_judge_arguments(parser)
    parser.add_argument("--per-class", type=positive_int, default=10, help="held-out images per class to complete")
    parser.add_argument("--vary-images", type=positive_int, default=8,
                        help="held-out images to vary (8 variations each)")
    parser.add_argument("--seed", type=seed_int, default=20_000)
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--pictures", help="folder for edit-inpaint[-NAME].png and edit-vary[-NAME].png")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)
    sampler = judged_model(parser, args)
    # digits32: the classifier and held-out images only
    ref = judge_of_data(parser, args, sampler) or build_reference(split_size=CLASSIFIER_TRAIN_SIZE)
    chosen = pick(ref.heldout_labels, args.per_class)
    size = sampler.config.image_size
    images = ref.heldout[chosen].reshape(len(chosen), image_channels(sampler.config), size, size)
    labels = ref.heldout_labels[chosen]
    images = to_unit(to_uint8(images.astype(np.float32)))  # what a user's PNG holds
    started = time.perf_counter()
    defaults = sampler.defaults
    report = {"images": len(chosen), "recommended_cfg": defaults.cfg_scale,
              "recommended_cfg_interval": list(defaults.cfg_interval) if defaults.cfg_interval else None,
              "steps_per_stage": defaults.steps_per_stage, "completion": {}}
    completed = {}
    for name, cfg in (("recommended", sampler.defaults.cfg_scale), ("no guidance", 1.0)):
        completed[name] = completion(sampler, ref, images, labels, cfg, args.seed)
        report["completion"][name] = {h: {k: v for k, v in row.items() if k != "edits"}
                                      for h, row in completed[name].items()}
    varied = variations(sampler, ref, images[:args.vary_images], labels[:args.vary_images], 8, args.seed)
    report["vary"] = {k: {m: v for m, v in row.items() if m != "outs"} for k, row in varied.items()}
    report["quality_seconds"] = time.perf_counter() - started
    if not args.skip_cost:
        report["cost_batch"] = min(32, len(chosen))
        report["seconds_per_image"] = cost(sampler, images[:32], labels[:32])
    report["load_average"] = os.getloadavg()
    if args.pictures:
        name = "" if args.data == DIGITS32 else "-" + Path(args.data).stem
        pictures(args.pictures, images, completed["recommended"], varied, name=name)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        atomic_write_text(args.json, text + "\n")


if __name__ == "__main__":
    main()
