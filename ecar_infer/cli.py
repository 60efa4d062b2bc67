"""`ecar-sample`: class-conditional images from an E-CAR checkpoint (or random weights) to image or NPZ files.

    ecar-sample --class 3 --n 16                             # a PNG grid, samples.png, from the shipped model
    ecar-sample --class all --per-class 100 --npz digits.npz  # ADM-evaluator file: uint8 NHWC arr_0 + labels
    ecar-sample --class 0-9 --outdir out/ --steps 8,10,12     # one PNG per image: out/class003_seed000017.png
    ecar-sample --random-init ecar-b --class 207 --n 1        # random weights: noise, for smoke tests and timing
    torchrun --nproc-per-node 8 -m ecar_infer.cli --class all --per-class 50 --npz fid50k.npz

Errors the user can fix print one line `ecar-sample: error: ...` and exit with status 2; anything else is
a bug and shows its traceback (status 1). Outputs are checked for writability before sampling and written
atomically. --outdir and --npz write each batch as soon as it is sampled (--npz into FILE.parts/, joined
into FILE at the end) beside a record of the run's settings, so rerunning an interrupted command (Ctrl-C
exits with status 130) resumes it, with any number of ranks, and a rerun with other settings is refused.
Under torchrun (WORLD_SIZE > 1) each rank samples its share of the batches on its own device; the result
is byte-identical to one process (ecar_infer/distributed.py). ecar-edit (edit_cli.py) shares its options,
model loading, class expansion and outputs from here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .checks import MAX_GUIDANCE, MAX_SEED
from .class_names import ClassNameError, list_classes, match_key, resolve_class
from .command import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser, UsageError, check_writable_file,
                      check_writable_folder, checked, content_sha256, image_count, interval_spec, make_folder,
                      normalize, one_line, positive_int, seed_int, steps_spec, stops_on_sigterm, user_errors,
                      warnings_to_stderr)
from .cpu_memory import keep_freed_memory
from .registry import get_preset, preset_names
from .schedule import CFG_SCHEDULES
from .weights import checkpoint_path  # --ckpt: a file, a shipped model's name, or None (the default)

PROG = "ecar-sample"
DEFAULT_OUT = "samples.png"
MAX_GRID_COLUMNS = 16  # a grid has one row per class while --per-class fits in a row
MAX_IMAGES = 10_000_000   # one command's images (an FID set is 50,000): a typo must not fill the memory
MAX_GRID_IMAGES = 10_000  # a grid --out holds every image in memory until it is written
DEFAULT_RANK_TIMEOUT = 600
MAX_RANK_TIMEOUT = 10**7   # seconds (116 days), a bound a typo cannot pass (near 8.6e13 s the timedelta the
                           # ranks are joined with overflows, in a traceback on every rank)


# ---- argument types (the shared ones: command.py) ----------------------------------------------------
rank_timeout = checked(int, lambda v: 0 < v <= MAX_RANK_TIMEOUT, f"a number of seconds in 1..{MAX_RANK_TIMEOUT:,}")
guidance_float = checked(float, lambda v: math.isfinite(v) and abs(v) <= MAX_GUIDANCE,
                         "a finite number within -10,000..10,000")


def class_spec(text: str) -> list[str | None]:
    """'3', '0-9', 'all', a class name or a comma list of them -> one entry per part (None: all classes); the
    parts are resolved once the model's class names are known (expand_classes)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty class: give indices, ranges like 0-9, names "
                                         f"or all, separated by commas")
    return [None if part.lower() == "all" else part for part in parts]


DESCRIPTION = ("Sample class-conditional images from an E-CAR model, in one process or as every rank of torchrun. "
               "Options may also be spelled with underscores (--cfg_scale).")


def build_parser(prog: str = PROG, description: str = DESCRIPTION, default_out: str = DEFAULT_OUT,
                 torchrun: bool = True) -> Parser:
    """ecar-sample's options; with torchrun=False, those of a command that runs in one process and writes
    its output once, at the end (ecar-edit): no --rank-timeout, and no help about ranks or resuming.

    Every option but --n is spelled so that torchrun passes it through to the script: none is a prefix of a
    torchrun option. --n is (of --nnodes and --nproc-per-node): the short form of --per-class, kept for the
    plain command; under torchrun write --per-class (tests/test_cli.py checks both)."""
    from .weights import default_checkpoint, shipped_models

    p = Parser(prog=prog, description=description, allow_abbrev=False)  # --clas is a typo, not --class
    what = p.add_argument_group("what to sample")
    what.add_argument("--class", dest="classes", action="append", type=class_spec, required=True, metavar="C",
                      help="class index, name (or an unambiguous prefix of one), range (0-9), comma list or "
                           "'all'; repeatable")
    what.add_argument("--per-class", "--n", dest="per_class", type=positive_int, default=1, metavar="N",
                      help="images per class (default 1)" + ("; under torchrun spell it --per-class (torchrun "
                           "takes --n for its own --nnodes / --nproc-per-node)" if torchrun else ""))
    what.add_argument("--seed", type=seed_int, default=0, metavar="S", help="image k gets seed SEED+k (default 0)")
    model = p.add_argument_group("model")
    model.add_argument("--ckpt", metavar="PATH", help=f"checkpoint .safetensors or *.safetensors.index.json, or "
                                      f"the name of a shipped model ({', '.join(shipped_models())}; default: "
                                      f"{default_checkpoint().stem})")
    model.add_argument("--random-init", choices=preset_names(), metavar="PRESET",
                       help=f"random weights of a preset instead of a checkpoint: the images are noise "
                            f"({', '.join(preset_names())})")
    model.add_argument("--vae", metavar="PATH",
                       help="local diffusers AutoencoderKL folder or .safetensors file (sd-vae models)")
    model.add_argument("--vae-slicing", action="store_true", help="decode the batch one image at a time")
    model.add_argument("--vae-tiling", action="store_true", help="decode in overlapping tiles")
    sampling = p.add_argument_group("sampling (defaults: the checkpoint's recommended settings)")
    sampling.add_argument("--cfg-scale", type=guidance_float, metavar="W",
                          help="classifier-free guidance weight w (-10,000..10,000)")
    sampling.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="guidance over the stages")
    sampling.add_argument("--cfg-interval", type=interval_spec, metavar="LO,HI",
                          help="guide only where LO <= sigma <= HI (0,1: everywhere)")
    sampling.add_argument("--steps", type=steps_spec, metavar="N|a,b,c", help="Euler steps per stage")
    run = p.add_argument_group("execution")
    run.add_argument("--batch-size", type=positive_int, default=64, metavar="B", help="images per batch (default 64)")
    run.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                     help="under torchrun, CUDA means each rank's cuda:LOCAL_RANK" if torchrun else "default auto")
    run.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on CUDA, fp32 on CPU")
    run.add_argument("--no-cuda-graphs", action="store_true", help="run eagerly on CUDA")
    run.add_argument("--compile", action="store_true",
                     help="wrap each sampling unit in torch.compile (optional; minutes of compilation at first use)")
    run.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                     help="allow TF32 for fp32 matmuls on CUDA (default on)")
    if torchrun:
        run.add_argument("--rank-timeout", type=rank_timeout, default=DEFAULT_RANK_TIMEOUT, metavar="S",
                         help=f"under torchrun, how long a rank waits for the others before it stops with an "
                              f"error (default {DEFAULT_RANK_TIMEOUT}; a rank that exits is noticed at once)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    outputs = p.add_argument_group("output (one of --out, --outdir, --npz)")
    out = outputs.add_mutually_exclusive_group()
    out.add_argument("--out", metavar="FILE", help=f"one grid image (.png, .jpg or .webp), a row per class while "
                                                   f"--per-class is 2-{MAX_GRID_COLUMNS} (default {default_out})")
    outputs.add_argument("--label-rows", action="store_true",
                         help="write each row's class name beside the --out grid (one row per class)")
    out.add_argument("--outdir", metavar="DIR", help="one PNG per image: DIR/class003_seed000017.png " + (
        "(resumes; torchrun shards it)" if torchrun else "(each written atomically once all are edited; no resume)"))
    out.add_argument("--npz", metavar="FILE", help="ADM-evaluator file FILE.npz: uint8 NHWC arr_0 and labels " + (
        "(resumes from FILE.parts/; torchrun shards it)" if torchrun else "(written atomically)"))
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return resolve_output(build_parser().parse_args(normalize(argv)), DEFAULT_OUT)


def resolve_output(args: argparse.Namespace, default_out: str) -> argparse.Namespace:
    """The output options as given, checked: empty names are errors (not the default), --label-rows
    only labels a grid, and without any output option the grid goes to `default_out`."""
    for option in ("out", "outdir", "npz"):
        if getattr(args, option) == "":
            raise UsageError(f"--{option} is empty: give a {'folder' if option == 'outdir' else 'file'} name")
    if args.label_rows and (args.outdir or args.npz):
        raise UsageError(f"--label-rows labels the rows of an --out grid: it does nothing with "
                         f"--{'outdir' if args.outdir else 'npz'}")
    if not (args.out or args.outdir or args.npz):
        args.out = default_out
    return args


# ---- before sampling: every user error shows up here -------------------------------------------------
def check_output(args, world: int) -> None:
    """Fail before any sampling if the output is misnamed or cannot be written."""
    if args.out and world > 1:
        raise UsageError("--out writes one grid from one process; under torchrun write --npz FILE or --outdir DIR")
    if args.outdir:
        make_folder(Path(args.outdir), "--outdir")
        check_writable_folder(Path(args.outdir))
        return
    target = Path(args.npz or args.out)
    check_writable_file(target)
    from .output import IMAGE_FORMATS

    if args.out and target.suffix.lower() not in IMAGE_FORMATS:
        raise UsageError(f"--out {target}: name the grid image with one of {', '.join(IMAGE_FORMATS)} (the "
                         f"format follows the extension)")
    if args.npz and target.suffix.lower() != ".npz":
        raise UsageError(f"--npz {target}: the file name must end in .npz")


def sampling_device(args, group: distributed.Group) -> str:
    """--device as a torch device string; under torchrun CUDA means this rank's cuda:LOCAL_RANK."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    if args.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    if group.local_rank >= torch.cuda.device_count():
        raise UsageError(f"local rank {group.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                         f"start at most that many ranks per machine (torchrun --nproc-per-node)")
    if group.world == 1:
        return "cuda"
    torch.cuda.set_device(group.local_rank)  # so that CUDA graphs and streams of this rank live on its GPU
    return f"cuda:{group.local_rank}"


def load_sampler(args, group: distributed.Group = distributed.Group()):
    """The sampler of --ckpt (or --random-init), with --vae for a latent model; a pixel model refuses --vae,
    from its config alone, before the model is built (building it warned that the VAE goes unused first:
    two lines for one mistake)."""
    if args.vae is not None and model_config(args).latent_kind == "pixel":
        raise UsageError(f"--vae {args.vae}: this model works in pixel space and decodes without a VAE; leave "
                         f"--vae out")
    from .kernels.dispatch import forced_backend
    from .sampler import Sampler

    forced_backend()  # reads ECAR_BACKEND now: a bad value is refused before any work (BackendError)
    options = dict(device=sampling_device(args, group), dtype=args.dtype, vae=args.vae,
                   cuda_graphs=not args.no_cuda_graphs, compile=args.compile, tf32=args.tf32, progress=False)
    if args.random_init:
        if args.ckpt:
            raise UsageError("give --ckpt or --random-init, not both")
        # through the logger: the command's handler names the program (ecar-sample or ecar-edit) and speaks
        # for rank 0 alone
        logging.getLogger("ecar_infer").warning(f"--random-init {args.random_init}: RANDOM weights, the images "
                                                f"are noise (for smoke tests and timing only)")
        sampler = Sampler.from_config(get_preset(args.random_init), random_vae=args.vae is None, **options)
        sampler.decoder.set_memory_options(args.vae_slicing, args.vae_tiling)
        return sampler
    path = checkpoint_path(args.ckpt)
    if not args.ckpt and not path.exists():
        raise UsageError(f"no checkpoint given and the default model is not installed at {path}; train it with "
                         f"`ecar-train --preset {path.stem} --out {path}` (see the model card in {path.parent}), "
                         f"pass --ckpt PATH, or sample random weights with --random-init ecar-tiny")
    from .vae import VAEError

    try:
        return Sampler.from_pretrained(path, vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling, **options)
    except VAEError:
        if args.vae is None:  # the one VAE error without a VAE given: the model needs one
            raise UsageError(f"{path} is a latent-space model that decodes through an SD-VAE: pass --vae PATH "
                             f"(a local diffusers AutoencoderKL folder or .safetensors file)") from None
        raise


def model_config(args):
    """The config of --random-init's preset or of --ckpt's header (a checkpoint that cannot be read is
    refused here, as loading it would be)."""
    if args.random_init:
        return get_preset(args.random_init)
    from .checkpoint import read_checkpoint_header

    return read_checkpoint_header(checkpoint_path(args.ckpt))[0]


def expand_classes(specs: list[list[str | None]], num_classes: int, n: int,
                   names: list[str] | None = None) -> list[int]:
    """The class of every image: each --class part, a class name (exact, by match_key: so a class named
    "2" or "3d" is found by its name), an index, a range LO-HI, or None for all, then `n` images per class."""
    classes = []
    for part in (p for spec in specs for p in spec):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part) if part is not None else None
        if part is None:
            lo, hi = 0, num_classes - 1
        elif match and not (names and match_key(part) in {match_key(name) for name in names}):
            lo, hi = int(match[1]), int(match[2] or match[1])
            if lo > hi:
                raise UsageError(f"--class {part}: a range runs from low to high, e.g. {hi}-{lo}")
        else:
            try:
                lo = hi = resolve_class(part, names, num_classes)
            except ClassNameError as err:
                raise UsageError(f"--class: {err}") from None
        if hi >= num_classes:
            given = f"{lo}" if lo == hi else f"{lo}-{hi}"
            listing = f": {list_classes(names, num_classes)}" if names else f" 0-{num_classes - 1}"
            raise UsageError(f"--class {given} is outside this model's classes{listing}")
        classes.extend(range(lo, hi + 1))
    if len(classes) * n > MAX_IMAGES:
        raise UsageError(f"--class and --per-class ask for {len(classes)} x {n} = {len(classes) * n:,} images, more "
                         f"than the {MAX_IMAGES:,} one command samples: split the request (by --class, or with "
                         f"another --seed)")
    return [c for c in classes for _ in range(n)]


def check_sampling_args(args, sampler, count: int) -> None:
    """What generate() would refuse, said in the command line's terms before any work."""
    from .schedule import plan_for

    num_stages = sampler.config.num_stages
    if isinstance(args.steps, tuple) and len(args.steps) != num_stages:
        raise UsageError(f"--steps gives {len(args.steps)} values but the model has {num_stages} stages: give one "
                         f"value for all stages, or one per stage ({num_stages})")
    if args.out and count > MAX_GRID_IMAGES:
        raise UsageError(f"--out {args.out}: a grid holds every image in memory until it is written, at most "
                         f"{MAX_GRID_IMAGES:,} (this request has {count:,}); write them with --outdir DIR or "
                         f"--npz FILE")
    if args.seed + count - 1 > MAX_SEED:
        raise UsageError(f"--seed {args.seed} is too large for {count} images: image k gets seed SEED+k, which "
                         f"must stay at most 2**64-1; use a --seed of at most {MAX_SEED - count + 1}")
    if sampler.config.shortcut:   # a shortcut head's power-of-two step counts
        try:
            plan_for(sampler.config, args.steps or sampler.defaults.steps_per_stage)
        except ValueError as err:
            raise UsageError(f"--steps: {err}") from None


SETTINGS_DTYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}   # as records spell it


def sampling_record(args, sampler, labels: list[int]) -> dict:
    """What decides the pixels of a run, with every default resolved (so spelling out a default is no
    change): a rerun writes into the same --npz or --outdir only if all of it agrees."""

    config, defaults = sampler.config, sampler.defaults
    latent = config.latent_kind != "pixel"  # only latent-space models decode through a VAE
    steps = defaults.steps_per_stage if args.steps is None else args.steps
    interval = defaults.guidance_interval(args.cfg_interval)
    cuda = sampler.device.type == "cuda"
    # the checkpoint and the VAE by content, not by path: a copy staged elsewhere (another machine's mount, a
    # scratch folder) resumes the run; a file replaced under the same name does not
    ckpt = None if args.random_init else checkpoint_path(args.ckpt)
    vae = Path(args.vae) if latent and args.vae else None
    return dict(
        ckpt_sha256=content_sha256(ckpt) if ckpt else None,
        random_init=args.random_init,
        vae_sha256=(content_sha256(vae) if vae else "random") if latent else None,
        vae_slicing=args.vae_slicing if latent else None,
        vae_tiling=args.vae_tiling if latent else None,
        seed=args.seed,
        batch_size=args.batch_size,
        labels_sha256=hashlib.sha256(json.dumps(labels).encode()).hexdigest(),
        cfg_scale=float(defaults.cfg_scale if args.cfg_scale is None else args.cfg_scale),
        cfg_schedule=args.cfg_schedule or defaults.cfg_schedule,
        cfg_interval=None if interval is None else list(interval),
        steps=[steps] * config.num_stages if isinstance(steps, int) else list(steps),
        device=sampler.device.type,
        dtype=SETTINGS_DTYPE[str(sampler.dtype)],
        cuda_graphs=sampler.runner.graphs_enabled,
        compile=args.compile,
        tf32=args.tf32 if cuda else None,
    )


@dataclass
class Job:
    sampler: object
    target: object   # an ecar_infer.targets.Target, imported where it is built (--help must not load torch)
    settings: dict
    sampling_kwargs: dict


def make_target(args, sampler, labels: list[int], seeds: list[int]):
    from .targets import FolderTarget, GridTarget, NpzTarget

    if args.npz:
        return NpzTarget(args.npz, labels, seeds, args.batch_size)
    if args.outdir:
        return FolderTarget(args.outdir, labels, seeds, args.batch_size)
    # a row per class while --per-class fits in one, and always with --label-rows: a row then names one class
    columns = args.per_class if 1 < args.per_class <= MAX_GRID_COLUMNS or args.label_rows else None
    names = (sampler.class_names or [str(i) for i in range(sampler.config.num_classes)]
             if args.label_rows else None)
    return GridTarget(args.out, labels, seeds, args.batch_size, columns, names)


def prepare_job(args, group: distributed.Group) -> Job:
    check_output(args, group.world)
    sampler = load_sampler(args, group)
    labels = expand_classes(args.classes, sampler.config.num_classes, args.per_class, sampler.class_names)
    check_sampling_args(args, sampler, len(labels))
    seeds = [args.seed + k for k in range(len(labels))]  # image k gets seed SEED+k
    kwargs = dict(cfg_scale=args.cfg_scale, steps_per_stage=args.steps, cfg_schedule=args.cfg_schedule,
                  cfg_interval=args.cfg_interval, output_type="np", progress=False)
    return Job(sampler, make_target(args, sampler, labels, seeds), sampling_record(args, sampler, labels), kwargs)


# ---- the run -----------------------------------------------------------------------------------------
def agree(group: distributed.Group, error: str | None) -> str | None:
    """Every rank learns whether any rank failed; the first failure, named by its rank if not rank 0."""
    errors = group.gather(error)
    for rank, message in enumerate(errors):
        if message is not None:
            return message if rank == 0 else f"rank {rank}: {message}"
    return None


def settings_disagreement(every: list[dict]) -> str | None:
    """Why the ranks' run settings (in rank order) cannot make one output, or None where all agree."""
    from .targets import differing_settings

    for rank, settings in enumerate(every[1:], start=1):
        differ = differing_settings(every[0], settings)
        if differ:
            return (f"rank {rank}'s settings differ from rank 0's ({', '.join(differ)}): every rank must run the "
                    f"same command with the same checkpoint and VAE, on devices of one kind")
    return None


def plan(args, group: distributed.Group) -> tuple[Job | None, list[int] | str]:
    """Prepare on every rank, check that the ranks agree on the settings, then rank 0 checks the target's
    settings record and lists the batches it lacks. Every rank gets the same answer: the batches to sample,
    or the error that stops the run."""
    try:
        job, error = prepare_job(args, group), None
    except KeyboardInterrupt:  # before user_errors(), whose imports must not run inside an interrupted import
        raise
    except user_errors() as err:
        job, error = None, one_line(err)
    answer = agree(group, error)
    if answer is None:   # the same command on every machine may meet another checkpoint file, or another GPU
        answer = settings_disagreement(group.gather(job.settings))
    from .targets import ResumeError

    if answer is None and group.rank == 0:
        try:
            answer = job.target.start(job.settings)
        except ResumeError as err:
            answer = one_line(err)
    return job, group.broadcast(answer)


def sample(args, group: distributed.Group, job: Job, todo: list[int], started: float) -> int:
    """Sample this rank's share of the batches `todo`; rank 0 then completes the output and reports."""
    from tqdm.auto import tqdm

    target = job.target
    report = group.rank == 0 and not args.quiet
    if 0 < len(todo) < len(target.batches) and report:
        print(f"{PROG}: {len(target.batches) - len(todo)} of {len(target.batches)} batches are already in "
              f"{target.where()}; sampling the other {len(todo)}", file=sys.stderr)
    missing = set(todo)
    bar = tqdm(total=len(target.labels), unit="img", desc="sampling", dynamic_ncols=True,
               initial=sum(len(batch) for b, batch in enumerate(target.batches) if b not in missing),
               disable=not report or args.no_progress or not todo)

    def sample_batch(b: int) -> tuple[int, float]:
        batch = target.batches[b]
        out = job.sampler.generate([target.labels[i] for i in batch], seed=[target.seeds[i] for i in batch],
                                   **job.sampling_kwargs)
        target.write(b, out.images)
        return len(batch), out.timings["total_s"]

    loop_started = time.perf_counter()
    with bar:  # closed (its last state drawn) before any message about an interruption
        tally = distributed.sample_in_rounds(group, todo, sample_batch, bar.update)
    seconds = time.perf_counter() - loop_started
    if group.rank != 0:
        return 0
    from .targets import ResumeError

    try:
        written = target.finish()
    except ResumeError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if report:
        print(summary(tally, seconds, written, time.perf_counter() - started) if todo else
              f"nothing to sample: the {image_count(len(target.labels))} of this request are already written "
              f"({written})")
    return 0


def summary(tally: distributed.Tally, seconds: float, written: str, total: float) -> str:
    """One line: images/s of the whole run (wall time of the sampling loop) and, with several ranks, of
    each rank (its own sampling time)."""
    count = sum(tally.images)
    rate = f"{count / seconds if seconds > 0 else 0.0:.2f} images/s"
    if len(tally.images) > 1:
        per_rank = ", ".join(f"{n / s if s > 0 else 0.0:.2f}" for n, s in zip(tally.images, tally.seconds))
        rate += f" on {len(tally.images)} ranks; per rank: {per_rank} images/s"
    return f"sampled {image_count(count)} in {seconds:.2f} s ({rate}); wrote {written}; total {total:.2f} s"


@stops_on_sigterm
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    keep_freed_memory()
    rank0 = distributed.launched_rank() == 0  # under torchrun every rank runs this; rank 0 speaks for all
    with warnings_to_stderr(PROG, shown=rank0):
        return _run(argv, started, rank0)


def _run(argv: list[str] | None, started: float, rank0: bool) -> int:
    """ecar-sample once its warnings are routed: every failure ends in one line and an exit status."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except UsageError as err:
        if rank0:
            print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    group = job = None
    try:
        group = distributed.join(args.rank_timeout)
        job, todo = plan(args, group)
        if isinstance(todo, str):
            if rank0:
                print(f"{PROG}: error: {todo}", file=sys.stderr)
            return EXIT_USER_ERROR
        return sample(args, group, job, todo, started)
    except KeyboardInterrupt:
        if rank0:
            saved = job.target.saved() if job else "nothing was written"
            resume = "; rerun the same command to resume" if job and job.target.resumable else ""
            print(f"{PROG}: interrupted: {saved}{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except distributed.RankLost as err:
        keep = (f"; the finished batches are kept in {job.target.where()}, rerun the same command to resume"
                if job and job.target.resumable else "")
        print(f"{PROG}: error: rank {distributed.launched_rank()}: {one_line(err)}{keep}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:
        print(f"{PROG}: error: could not write the output: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        distributed.leave(group)


if __name__ == "__main__":
    sys.exit(main())
