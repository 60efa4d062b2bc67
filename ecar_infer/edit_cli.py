"""`ecar-edit`: inpaint, outpaint or vary an image with an E-CAR model, without retraining.

    ecar-edit --image in.png --mask mask.png --class 3 --n 8 --out edits.png  # mask: white where kept
    ecar-edit --image in.png --mask left --class 3 --n 8                      # regenerate the left half
    ecar-edit --image in.png --mode outpaint --mask center --class 3 --n 8    # keep the centre, draw around it
    ecar-edit --image in.png --mode vary --from-stage 2 --class 3 --n 8       # variations keeping the layout
    ecar-edit --image photo.jpg --fit --mask center --class 3 --n 8           # any size: resized, centre-cropped

It takes the options of `ecar-sample` (model, sampling, execution; output as one grid image with
--label-rows, --outdir or --npz) with the same meaning, except that it runs in one process (no torchrun,
no --rank-timeout) and writes its output once every image is edited (no resume; an existing --npz file or
--outdir image it would write is refused, not replaced), plus --image, --mask, --fit,
--mode and --from-stage. Each output image k uses seed --seed + k. Every user error prints one line
`ecar-edit: error: ...` and exits with status 2, before any sampling (the library's errors are said in
the command line's terms); outputs are checked for writability first and written atomically. Ctrl-C
prints what was written and exits with status 130.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from . import cli, distributed
from .checks import some_of
from .command import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser, UsageError, image_count, normalize,
                      one_line, stops_on_sigterm, user_errors, warnings_to_stderr)
from .cpu_memory import keep_freed_memory
from .pil_input import ImageTooLarge, open_image

PROG = "ecar-edit"
DEFAULT_OUT = "edits.png"
DESCRIPTION = ("Inpaint, outpaint or vary an image with an E-CAR model (no retraining). Takes ecar-sample's "
               "options, in one process. Options may also be spelled with underscores.")

# EditInputError speaks Python (Sampler.edit's arguments); the command line's words for the same things.
# The CLI gives one --image, edited once per output image.
CLI_TERMS = (
    (r"\bfrom_stage\b", "--from-stage"),
    (r"\bmode '(\w+)'", r"--mode \1"),
    (r"\b(no|with|needs)(?: the| a)? mask\b", r"\1 --mask"),
    (r"\bTrue \(white\)", "white"),
    (r"\bimage\(s\) \[[\d, ]*\]", "--image"),
    (r"\bgenerate\(\)", "ecar-sample"),
    (r"\buint8 masks keep values >= 128", "mask pixels >= 128 are kept"),
)


def in_cli_terms(message: str) -> str:
    """An EditInputError's message with the library's names replaced by the command line's."""
    for pattern, replacement in CLI_TERMS:
        message = re.sub(pattern, replacement, message)
    return message


# editing.py's MODES and REGIONS, spelled out: --help must not import torch (editing does); a test keeps them equal
MODES = ("inpaint", "outpaint", "vary")
REGIONS = ("left", "right", "top", "bottom", "center", "border")


def build_parser() -> Parser:
    p = cli.build_parser(PROG, DESCRIPTION, DEFAULT_OUT, torchrun=False)
    edit = p.add_argument_group("what to edit")
    edit.add_argument("--image", required=True, metavar="PNG",
                      help="the image to edit, at the model's image size (or any size, with --fit)")
    edit.add_argument("--mask", metavar="PNG|REGION",
                      help=f"a mask image, white where the pixels are kept, or a built-in region "
                           f"({', '.join(REGIONS)}): inpaint regenerates it, outpaint keeps it; "
                           f"not with --mode vary")
    edit.add_argument("--fit", action="store_true",
                      help="resize and centre-crop --image (and a --mask image, which must be the same size) to "
                           "the model's image size, as training reads images")
    edit.add_argument("--mode", choices=MODES, default="inpaint", help="default inpaint")
    edit.add_argument("--from-stage", type=int, metavar="K",
                      help="keep the image's stages below K wholly (0-based; default for --mode vary: the last stage, "
                           "e.g. 2 of a 3-stage model, so that only the finest is regenerated; else 0)")
    return p


def read_image(path: str, what: str, size: int | None):
    """A PIL image from `path`, checked to be size x size before its pixels are decoded (bounded work for
    any file); of any size for size None (PIL refuses a decompression bomb, over 2 x 89M pixels)."""
    from PIL import UnidentifiedImageError

    if not path:   # Path("") is the current folder
        raise UsageError(f"{what} is empty: give an image file")
    if Path(path).exists() and not Path(path).is_file():   # a FIFO would make Image.open wait forever
        raise UsageError(f"{what} {path}: not a regular file (a folder, a FIFO or a device); give an image file")
    try:
        image = open_image(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"cannot read {what} {path}: not an image file ({err})") from None
    except ImageTooLarge as err:
        raise UsageError(f"{what} {path} is {err}") from None
    except ValueError as err:   # Pillow's bound on a PNG's text chunks ("Decompressed Data Too Large")
        raise UsageError(f"cannot read {what} {path}: {err}") from None
    width, height = image.size
    if size is not None and (width, height) != (size, size):
        raise UsageError(f"{what} {path} is {width}x{height} pixels but the model makes {size}x{size} images: "
                         f"resize or crop it first, or give --fit")
    try:
        image.load()
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from None
    return image


def prepare_edit(args):
    """Everything before editing, where every user error shows up: (sampler, labels, image, mask)."""
    cli.check_output(args, world=1)
    sampler = cli.load_sampler(args)
    config = sampler.config
    labels = cli.expand_classes(args.classes, config.num_classes, args.per_class, sampler.class_names)
    cli.check_sampling_args(args, sampler, len(labels))
    if len(labels) > cli.MAX_GRID_IMAGES:   # ecar-sample's --outdir and --npz write batch by batch; edit() does not
        raise UsageError(f"--class and --per-class ask for {len(labels):,} edits: ecar-edit holds every image in "
                         f"memory until it writes them, whatever the output, at most {cli.MAX_GRID_IMAGES:,}; "
                         f"split the request (by --class, or with another --seed)")
    from .editing import fitted_image, fitted_mask
    from .pil_input import upright_size

    size = None if args.fit else config.image_size
    image = read_image(args.image, "--image", size)
    mask = args.mask
    if mask is not None and mask.lower() in REGIONS:
        mask = mask.lower()
    elif mask is not None:
        if not Path(mask).exists():
            raise UsageError(f"--mask {mask}: no such file, and not a built-in region ({', '.join(REGIONS)})")
        mask = read_image(mask, "--mask", size)
        # fitted alike, they cover the same pixels only if the same size, as read (upright by their EXIF)
        (mask_w, mask_h), (image_w, image_h) = upright_size(mask), upright_size(image)
        if args.fit and (mask_w, mask_h) != (image_w, image_h):
            raise UsageError(f"--mask {args.mask} is {mask_w}x{mask_h} pixels but --image {args.image} is "
                             f"{image_w}x{image_h} (upright, as viewers show them): with --fit they must be the "
                             f"same size")
        if args.fit:
            mask = fitted_mask(mask, config.image_size)
    if args.fit:
        image = fitted_image(image, config)
    return sampler, labels, image, mask


def check_no_overwrite(args, target) -> None:
    """Refuse, before editing, to replace sample files: an --npz that exists (it may be an FID set of
    ecar-sample's, or its unfinished FILE.parts/), or in an --outdir any PNG this request would write, or an
    ecar-sample run's folder (its run.json would then vouch for edits as its samples). A grid --out is
    replaced, as ecar-sample replaces it."""
    from .targets import FolderTarget

    if args.npz:
        for path in (Path(args.npz), Path(f"{args.npz}.parts")):
            if path.exists():
                raise UsageError(f"--npz {args.npz}: {path} exists, and ecar-edit does not replace it: write "
                                 f"elsewhere, or delete it")
    elif isinstance(target, FolderTarget):
        record, found = target.record_path(), target.foreign_files()
        if record.exists():
            raise UsageError(f"--outdir {args.outdir} holds an ecar-sample run ({record.name}): write the edits "
                             f"elsewhere")
        if found:
            raise UsageError(f"--outdir {args.outdir} already holds {some_of([p.name for p in found], 1)} of "
                             f"the files this request would write: write elsewhere, or move them away")


def write(args, target, out) -> str:
    """The edits into ecar-sample's grid (--label-rows too) or folder `target`, or (target None) into one
    --npz file, not ecar-sample's resumable FILE.parts/; returns what was written."""
    if target is None:
        from .output import save_npz

        save_npz(out.images, out.class_labels, args.npz)
        return args.npz
    for b, batch in enumerate(target.batches):
        target.write(b, out.images[batch.start:batch.stop])
    return target.finish()


@stops_on_sigterm
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    keep_freed_memory()
    target = None  # where the output goes
    writing = False  # whether the edits are being written (before that, a Ctrl-C has written nothing)
    saved = None   # on Ctrl-C: what is on disk
    with warnings_to_stderr(PROG):
        try:
            if distributed.launched_world_size() > 1:
                raise UsageError("ecar-edit runs in one process: run it without torchrun (every rank would "
                                 "edit the same images and write the same file)")
            args = build_parser().parse_args(normalize(sys.argv[1:] if argv is None else list(argv)))
            args = cli.resolve_output(args, DEFAULT_OUT)
            from .editing import EditInputError   # torch: after --help, and inside the Ctrl-C handling

            try:  # prepare_edit() and edit() check the inputs (image, mask, mode, from_stage) before any sampling
                sampler, labels, image, mask = prepare_edit(args)
                seeds = [args.seed + k for k in range(len(labels))]  # image k gets seed SEED+k
                target = None if args.npz else cli.make_target(args, sampler, labels, seeds)
                check_no_overwrite(args, target)
                out = sampler.edit(image, labels, mask=mask, mode=args.mode, from_stage=args.from_stage,
                                   seed=seeds, cfg_scale=args.cfg_scale, steps_per_stage=args.steps,
                                   cfg_schedule=args.cfg_schedule, cfg_interval=args.cfg_interval,
                                   output_type="np", batch_size=args.batch_size,
                                   progress=not (args.quiet or args.no_progress))
            except EditInputError as err:
                raise UsageError(in_cli_terms(str(err))) from None
            writing = True
            try:
                written = write(args, target, out)
            except OSError as err:
                print(f"{PROG}: error: could not write the output: {err}", file=sys.stderr)
                return EXIT_FAILED
        except KeyboardInterrupt:  # before user_errors(), whose imports must not run inside an interrupted import
            saved = target.saved() if writing and target else "nothing was written"
        except SystemExit:   # --help and argparse's errors: matched here, before user_errors() imports torch
            raise
        except user_errors() as err:
            print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR
    if saved is not None:  # said once the interrupted call is unwound, so that its progress bar is closed
        print(f"{PROG}: interrupted: {saved}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        seconds = out.timings["total_s"]
        rate = f" ({len(labels) / seconds:.2f} images/s)" if seconds > 0 else ""
        print(f"edited {image_count(len(labels))} in {seconds:.2f} s{rate}; wrote {written}; "
              f"total {time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
