"""`ecar-edit`: inpaint, outpaint or vary an image with an E-CAR model, without retraining.

    ecar-edit --image in.png --mask mask.png --class 3 --n 8 --out edits.png  # mask: white where kept
    ecar-edit --image in.png --mask left --class 3 --n 8                      # regenerate the left half
    ecar-edit --image in.png --mode outpaint --mask center --class 3 --n 8    # keep the centre, draw around it
    ecar-edit --image in.png --mode vary --from-stage 2 --class 3 --n 8       # variations keeping the layout

It takes every option of `ecar-sample` (model, sampling, execution; output as one PNG grid, --outdir or
--npz) with the same meaning, plus --image, --mask, --mode and --from-stage. Each output image k uses
seed --seed + k. Every user error prints one line `ecar-edit: error: ...` and exits with status 2, before
any sampling; outputs are checked for writability first and written atomically.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

from . import cli
from .editing import MODES, REGIONS
from .editing import EditInputError
from .output import make_grid, save_image, save_npz

PROG = "ecar-edit"
DEFAULT_OUT = "edits.png"


class Parser(cli.Parser):
    def error(self, message: str):
        raise cli.UsageError(f"{message} (see {PROG} --help)")


def build_parser() -> Parser:
    # ecar-sample's options, inherited whole so both commands stay in step; -h is redefined here
    p = Parser(prog=PROG, parents=[cli.build_parser()], conflict_handler="resolve",
               description="Inpaint, outpaint or vary an image with an E-CAR model (no retraining). Takes every "
                           "option of ecar-sample. Options may also be spelled with underscores.")
    helps = {"out": f"one PNG grid, a row per class (default {DEFAULT_OUT})",
             "npz": "ADM-evaluator file: uint8 NHWC arr_0 and labels"}
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    edit = p.add_argument_group("what to edit")
    edit.add_argument("--image", required=True, metavar="PNG", help="the image to edit, at the model's image size")
    edit.add_argument("--mask", metavar="PNG|REGION",
                      help=f"a mask image, white where the pixels are kept, or a built-in region "
                           f"({', '.join(REGIONS)}): inpaint regenerates it, outpaint keeps it; "
                           f"not with --mode vary")
    edit.add_argument("--mode", choices=MODES, default="inpaint", help="default inpaint")
    edit.add_argument("--from-stage", type=int, metavar="K",
                      help="keep the image's stages below K wholly (0-based; default 1 for vary, else 0)")
    return p


def read_image(path: str, what: str, size: int):
    """A PIL image from `path`, checked to be size x size before its pixels are decoded (bounded work for
    any file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise cli.UsageError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise cli.UsageError(f"cannot read {what} {path}: not an image file ({err})") from None
    width, height = image.size
    if (width, height) != (size, size):
        raise cli.UsageError(f"{what} {path} is {width}x{height} pixels but the model makes {size}x{size} images: "
                             f"resize or crop it first")
    try:
        image.load()
    except (OSError, ValueError) as err:
        raise cli.UsageError(f"cannot read {what} {path}: {err}") from None
    return image


def prepare(args):
    """Everything before editing, where every user error shows up: (sampler, labels, image, mask)."""
    cli.check_output(args, world=1)
    sampler = cli.load_sampler(args)
    config = sampler.config
    labels = cli.expand_classes(args.classes, config.num_classes, args.per_class, cli.model_class_names(sampler))
    cli.check_sampling_args(args, sampler, len(labels))
    image = read_image(args.image, "--image", config.image_size)
    mask = args.mask
    if mask is not None and mask not in REGIONS:
        if not Path(mask).exists():
            raise cli.UsageError(f"--mask {mask}: no such file, and not a built-in region ({', '.join(REGIONS)})")
        mask = read_image(mask, "--mask", config.image_size)
    return sampler, labels, image, mask


def write(args, images, labels: list[int], seeds: list[int]) -> str:
    """The edits as a grid, one PNG each, or an NPZ file; returns what was written."""
    if args.outdir:
        for image, label, seed in zip(images, labels, seeds):
            save_image(image, Path(args.outdir) / f"class{label:03d}_seed{seed:06d}.png")
        return f"{len(labels)} PNG files in {args.outdir}"
    if args.npz:
        save_npz(images, labels, args.npz)
        return args.npz
    columns = args.per_class if 1 < args.per_class <= cli.MAX_GRID_COLUMNS else None
    save_image(make_grid(images, columns=columns), args.out)
    return f"{args.out} (a grid of {len(labels)})"


@contextlib.contextmanager
def warnings_to_stderr():
    """ecar_infer's warnings print as `ecar-edit: warning: ...` for the duration of the command."""
    logger = logging.getLogger("ecar_infer")
    others = [h for h in logger.handlers if isinstance(h, cli.StderrHandler)]
    handler = cli.StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    for h in others:
        logger.removeHandler(h)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for h in others:
            logger.addHandler(h)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    with warnings_to_stderr():
        try:
            args = build_parser().parse_args(cli.normalize(sys.argv[1:] if argv is None else list(argv)))
            args.out = args.out or (None if args.outdir or args.npz else DEFAULT_OUT)
            sampler, labels, image, mask = prepare(args)
            seeds = [args.seed + k for k in range(len(labels))]  # image k gets seed SEED+k
            # edit() checks its inputs (mask, mode, from_stage) before any sampling
            out = sampler.edit(image, labels, mask=mask, mode=args.mode, from_stage=args.from_stage, seed=seeds,
                               cfg_scale=args.cfg_scale, steps_per_stage=args.steps, cfg_schedule=args.cfg_schedule,
                               cfg_interval=args.cfg_interval, output_type="np", batch_size=args.batch_size)
        except (*cli.user_errors(), EditInputError) as err:
            print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        try:
            written = write(args, out.images, out.class_labels, out.seeds)
        except OSError as err:
            print(f"{PROG}: error: could not write the output: {err}", file=sys.stderr)
            return 1
    if not args.quiet:
        seconds = out.timings["total_s"]
        rate = f" ({len(labels) / seconds:.2f} images/s)" if seconds > 0 else ""
        print(f"edited {len(labels)} images in {seconds:.2f} s{rate}; wrote {written}; "
              f"total {time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
