"""`ecar-sample`: class-conditional images from an E-CAR checkpoint (or random weights) to PNG or NPZ files.

    ecar-sample --class 3 --n 16                          # a PNG grid, samples.png, from the shipped model
    ecar-sample --class all --n 100 --npz digits.npz       # ADM-evaluator file: uint8 NHWC arr_0 + labels
    ecar-sample --class 0-9 --outdir out/ --steps 8,10,12  # one PNG per image: out/class003_seed000017.png
    ecar-sample --random-init ecar-b --class 207 --n 1     # random weights: noise, for smoke tests and timing

Every user error prints one line `ecar-sample: error: ...` and exits with status 2; outputs are checked
for writability before sampling and written atomically. --outdir and --npz write each batch as soon as it
is sampled (--npz into FILE.parts/, joined into FILE at the end), so rerunning an interrupted command
resumes it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .config import ConfigError
from .registry import get_preset, preset_names
from .schedule import CFG_SCHEDULES

PROG = "ecar-sample"
DEFAULT_OUT = "samples.png"
MAX_GRID_COLUMNS = 16  # a grid has one row per class while --n fits in a row


class UsageError(Exception):
    """A mistake in the command line; printed as one line, exit status 2."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors printed as one line with status 2 (imported when needed: `--help` must not load torch)."""
    from .checkpoint import CheckpointError
    from .vae import VAEError

    return UsageError, ConfigError, CheckpointError, VAEError, ValueError


# ---- argument types ----------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def class_spec(text: str) -> list[tuple[int, int] | None]:
    """'3', '0-9', 'all' or a comma list of them -> inclusive ranges (None: all classes)."""
    ranges = []
    for part in text.split(","):
        part = part.strip().lower()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if part == "all":
            ranges.append(None)
        elif match and int(match[1]) <= int(match[2] or match[1]):
            ranges.append((int(match[1]), int(match[2] or match[1])))
        else:
            raise argparse.ArgumentTypeError(f"{part!r} is not a class: give an index, a range like 0-9, or all")
    return ranges


def steps_spec(text: str) -> int | tuple[int, ...]:
    """'10' (every stage) or '8,10,12' (one per stage)."""
    steps = tuple(positive_int(v) for v in text.split(","))
    return steps[0] if len(steps) == 1 else steps


def interval_spec(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give LO,HI (two sigmas in [0, 1]), got {text!r}") from None
    return lo, hi


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are user errors too: one line, status 2
        raise UsageError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    from .weights import default_checkpoint

    p = Parser(prog=PROG, description="Sample class-conditional images from an E-CAR model. Options may "
                                      "also be spelled with underscores (--cfg_scale).")
    what = p.add_argument_group("what to sample")
    what.add_argument("--class", dest="classes", action="append", type=class_spec, required=True, metavar="C",
                      help="class index, range (0-9), comma list or 'all'; repeatable")
    what.add_argument("--n", type=positive_int, default=1, help="images per class (default 1)")
    what.add_argument("--seed", type=int, default=0, metavar="S", help="image k gets seed SEED+k (default 0)")
    model = p.add_argument_group("model")
    model.add_argument("--ckpt", metavar="PATH", help=f"checkpoint .safetensors or *.safetensors.index.json "
                                      f"(default: {default_checkpoint()})")
    model.add_argument("--random-init", choices=preset_names(), metavar="PRESET",
                       help=f"random weights of a preset instead of a checkpoint: the images are noise "
                            f"({', '.join(preset_names())})")
    model.add_argument("--vae", metavar="PATH",
                       help="local diffusers AutoencoderKL folder or .safetensors file (sd-vae models)")
    model.add_argument("--vae-slicing", action="store_true", help="decode the batch one image at a time")
    model.add_argument("--vae-tiling", action="store_true", help="decode in overlapping tiles")
    sampling = p.add_argument_group("sampling (defaults: the checkpoint's recommended settings)")
    sampling.add_argument("--cfg-scale", type=float, metavar="W", help="classifier-free guidance weight w")
    sampling.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="guidance over the stages")
    sampling.add_argument("--cfg-interval", type=interval_spec, metavar="LO,HI",
                          help="guide only where LO <= sigma <= HI")
    sampling.add_argument("--steps", type=steps_spec, metavar="N|a,b,c", help="Euler steps per stage")
    run = p.add_argument_group("execution")
    run.add_argument("--batch-size", type=positive_int, default=64, metavar="B", help="images per batch (default 64)")
    run.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    run.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on CUDA, fp32 on CPU")
    run.add_argument("--no-cuda-graphs", action="store_true", help="run eagerly on CUDA")
    run.add_argument("--compile", action="store_true",
                     help="wrap each sampling unit in torch.compile (optional; minutes of compilation at first use)")
    run.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                     help="allow TF32 for fp32 matmuls on CUDA (default on)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    out = p.add_argument_group("output (one of)").add_mutually_exclusive_group()
    out.add_argument("--out", metavar="FILE", help=f"one PNG grid, a row per class (default {DEFAULT_OUT})")
    out.add_argument("--outdir", metavar="DIR", help="one PNG per image: DIR/class003_seed000017.png")
    out.add_argument("--npz", metavar="FILE", help="ADM-evaluator file: uint8 NHWC arr_0 and labels "
                                                   "(an interrupted run resumes from FILE.parts/)")
    return p


def normalize(argv: list[str]) -> list[str]:
    """--cfg_scale -> --cfg-scale (option names only; everything after a bare -- is left alone)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


# ---- the run -----------------------------------------------------------------------------------------
def check_writable(args) -> None:
    """Fail before any sampling if the output cannot be written."""
    if args.outdir:
        folder = Path(args.outdir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create --outdir {folder}: {err.strerror or err}") from None
    else:
        target = Path(args.npz or args.out)
        folder = target.parent
        if target.is_dir():
            raise UsageError(f"cannot write {target}: it is a directory")
        if not folder.is_dir():
            raise UsageError(f"cannot write {target}: directory {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {folder}: {err.strerror or err}") from None


def load_sampler(args):
    from .sampler import Sampler
    from .weights import default_checkpoint

    options = dict(device=args.device, dtype=args.dtype, vae=args.vae, cuda_graphs=not args.no_cuda_graphs,
                   compile=args.compile, tf32=args.tf32, progress=not (args.no_progress or args.quiet))
    if args.random_init:
        if args.ckpt:
            raise UsageError("give --ckpt or --random-init, not both")
        print(f"{PROG}: warning: --random-init {args.random_init}: RANDOM weights, the images are noise "
              f"(for smoke tests and timing only)", file=sys.stderr)
        sampler = Sampler.from_config(get_preset(args.random_init), random_vae=args.vae is None, **options)
        sampler.decoder.set_memory_options(args.vae_slicing, args.vae_tiling)
        return sampler
    path = Path(args.ckpt) if args.ckpt else default_checkpoint()
    if not args.ckpt and not path.exists():
        raise UsageError(f"no checkpoint given and the default model is not installed at {path}; train it with "
                         f"`ecar-train --preset {path.stem} --out {path}` (see the model card in {path.parent}), "
                         f"pass --ckpt PATH, or sample random weights with --random-init ecar-tiny")
    return Sampler.from_pretrained(path, vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling, **options)


def expand_classes(specs: list[list[tuple[int, int] | None]], num_classes: int, n: int) -> list[int]:
    classes = []
    for lo_hi in (r for spec in specs for r in spec):
        lo, hi = lo_hi if lo_hi is not None else (0, num_classes - 1)
        if hi >= num_classes:
            given = f"{lo}" if lo == hi else f"{lo}-{hi}"
            raise UsageError(f"--class {given} is outside this model's classes 0-{num_classes - 1}")
        classes.extend(range(lo, hi + 1))
    return [c for c in classes for _ in range(n)]


def prepare(args):
    """Everything before sampling, where every user error shows up: (sampler, class labels)."""
    check_writable(args)
    sampler = load_sampler(args)
    config = sampler.config
    labels = expand_classes(args.classes, config.num_classes, args.n)
    from .schedule import plan_steps

    # the step and interval checks of generate(), made now so that a bad value stops before any work
    plan_steps(config.num_stages, args.steps or sampler.defaults.steps_per_stage, cfg_interval=args.cfg_interval)
    if args.npz:
        check_npz_parts(args, labels)
    return sampler, labels


def image_path(outdir: str, label: int, seed: int) -> Path:
    return Path(outdir) / f"class{label:03d}_seed{seed:06d}.png"


def sample_outdir(args, sampler, labels: list[int], seeds: list[int], sampling_kwargs) -> tuple[int, float, str]:
    """One PNG per image, written batch by batch; images whose file exists already are skipped, so an
    interrupted run resumes where it stopped. Returns (images sampled, sampling seconds, description)."""
    from .output import save_png

    todo = [(y, s) for y, s in zip(labels, seeds) if not image_path(args.outdir, y, s).exists()]
    if len(todo) < len(labels) and not args.quiet:
        print(f"{PROG}: {len(labels) - len(todo)} of {len(labels)} images exist in {args.outdir}; "
              f"sampling the other {len(todo)}", file=sys.stderr)
    seconds = 0.0
    for i in range(0, len(todo), args.batch_size):
        chunk = todo[i:i + args.batch_size]
        out = sampler.generate([y for y, _ in chunk], seed=[s for _, s in chunk], **sampling_kwargs)
        seconds += out.timings["total_s"]
        for image, label, seed in zip(out.images, out.class_labels, out.seeds):
            save_png(image, image_path(args.outdir, label, seed))
    return len(todo), seconds, f"{len(todo)} PNG files in {args.outdir}"


def npz_manifest(args) -> Path:
    """FILE.parts/run.json: the settings of the --npz run whose batches FILE.parts/ holds."""
    return Path(f"{args.npz}.parts") / "run.json"


def npz_run_settings(args, labels: list[int]) -> dict:
    """What decides the pixels of an --npz run: a rerun resumes from saved batches only if all agree."""
    from .weights import default_checkpoint

    return dict(ckpt=None if args.random_init else str(Path(args.ckpt or default_checkpoint()).resolve()),
                random_init=args.random_init, vae=args.vae, seed=args.seed, batch_size=args.batch_size,
                labels_sha256=hashlib.sha256(json.dumps(labels).encode()).hexdigest(), cfg_scale=args.cfg_scale,
                cfg_schedule=args.cfg_schedule, cfg_interval=args.cfg_interval, steps=args.steps,
                device=args.device, dtype=args.dtype)


def check_npz_parts(args, labels: list[int]) -> None:
    """A parts folder left by an interrupted run with other settings stops the run before sampling."""
    manifest = npz_manifest(args)
    if not manifest.exists():
        return
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, ValueError):
        saved = {}
    now = json.loads(json.dumps(npz_run_settings(args, labels)))  # tuples -> lists, as saved
    differ = sorted(k for k in now.keys() | saved.keys() if now.get(k) != saved.get(k))
    if differ:
        raise UsageError(f"{manifest.parent} holds batches of an interrupted run with other settings "
                         f"({', '.join(differ)}): rerun that command to finish it, or delete the folder")


def sample_npz(args, sampler, labels: list[int], seeds: list[int], sampling_kwargs) -> tuple[int, float, str]:
    """The --npz archive, sampled batch by batch into FILE.parts/ (one atomic .npz per batch), so a rerun
    of an interrupted command resumes from the batches on disk; joined into FILE at the end, after which
    the folder is removed."""
    from .output import atomic_path, save_npz

    manifest = npz_manifest(args)
    parts = manifest.parent
    parts.mkdir(exist_ok=True)
    if not manifest.exists():
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps(npz_run_settings(args, labels), indent=1))
    starts = range(0, len(labels), args.batch_size)
    files = [parts / f"batch{b:06d}.npz" for b in range(len(starts))]
    done = sum(f.exists() for f in files)
    if done and not args.quiet:
        print(f"{PROG}: {done} of {len(files)} batches exist in {parts}; sampling the other "
              f"{len(files) - done}", file=sys.stderr)
    count, seconds = 0, 0.0
    for start, file in zip(starts, files):
        if file.exists():
            continue
        chunk = slice(start, start + args.batch_size)
        out = sampler.generate(labels[chunk], seed=seeds[chunk], **sampling_kwargs)
        save_npz(out.images, out.class_labels, file)
        count, seconds = count + len(out.seeds), seconds + out.timings["total_s"]
    arrays = []
    for file in files:
        with np.load(file) as data:
            arrays.append(data["arr_0"])
    save_npz(np.concatenate(arrays), labels, args.npz)
    shutil.rmtree(parts)
    return count, seconds, args.npz


def sample_grid(args, sampler, labels: list[int], seeds: list[int], sampling_kwargs) -> tuple[int, float, str]:
    """All images into one PNG grid, a row per class while --n fits in a row."""
    from .output import make_grid, save_png

    out = sampler.generate(labels, seed=seeds, batch_size=args.batch_size, **sampling_kwargs)
    columns = args.n if 1 < args.n <= MAX_GRID_COLUMNS else None
    save_png(make_grid(out.images, columns=columns), args.out)
    return len(labels), out.timings["total_s"], f"{args.out} (a grid of {len(labels)})"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    _route_warnings()
    try:
        args = build_parser().parse_args(normalize(sys.argv[1:] if argv is None else list(argv)))
        args.out = args.out or (None if args.outdir or args.npz else DEFAULT_OUT)
        sampler, labels = prepare(args)
    except Exception as err:  # (not `except user_errors()`: that would import torch for --help's SystemExit)
        if not isinstance(err, user_errors()):
            raise
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    seeds = [args.seed + k for k in range(len(labels))]  # image k gets seed SEED+k
    sampling_kwargs = dict(cfg_scale=args.cfg_scale, steps_per_stage=args.steps, cfg_schedule=args.cfg_schedule,
                           cfg_interval=args.cfg_interval, output_type="np")
    sample = sample_outdir if args.outdir else sample_npz if args.npz else sample_grid
    try:
        count, seconds, written = sample(args, sampler, labels, seeds, sampling_kwargs)
    except OSError as err:
        print(f"{PROG}: error: could not write the output: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        rate = f" ({count / seconds:.2f} images/s)" if seconds > 0 else ""
        print(f"sampled {count} images in {seconds:.2f} s{rate}; wrote {written}; "
              f"total {time.perf_counter() - started:.2f} s")
    return 0


class StderrHandler(logging.StreamHandler):
    """Writes each record to sys.stderr as it is at that moment (tests and callers may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _route_warnings() -> None:
    """ecar_infer's warnings (random VAE, unused VAE, ...) print as `ecar-sample: warning: ...`."""
    logger = logging.getLogger("ecar_infer")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
