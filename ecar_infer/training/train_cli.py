"""`ecar-train`: the command line and the training loop of the reference trainer (the objective of
docs/MODEL.md, "Training objective"; AdamW; an EMA of the weights, which is what ships), with periodic and
resumable checkpoints and data parallel training with torchrun.

    ecar-train --preset ecar-digits32 --threads 1 --out my-digits32.safetensors      # work folder runs/digits32
    ecar-train --data my_images/ --preset ecar-emoji32-attn-sc --set depth=8 --set num_classes=5 --flip
    ecar-train --data imagenet/train --vae sd-vae-ft-ema/ --preset ecar-b --flip --workdir runs/b
    torchrun --nproc_per_node 8 -m ecar_infer.training ...     # DistributedDataParallel, one GPU per rank

This module is the command line, ecar-train: its options and the training loop that writes the work folder.
Beside it: trainer.py (the training state: model, EMA, AdamW, one step), prepare.py (every check before the
first step), workdir.py (the work folder and its resume records) and ranks.py (torchrun's ranks).

Data (ecar_infer/training/data.py): digits32, an .npz or an image folder; a latent (sd-vae) model trains
from a cache of VAE latents encoded once (ecar_infer/training/latents.py) and never runs the encoder.

Errors the user can fix (options, data, unwritable outputs) print one line and exit with status 2 before
any training; Ctrl-C prints the step of the last saved state and exits with status 130.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..command import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser, UsageError, checked, normalize,
                       positive_int, seed_int, stops_on_sigterm, user_errors, warnings_to_stderr)
from ..cpu_memory import keep_freed_memory
from ..distributed import launched_rank
from ..registry import preset_names
from .prepare import prepare
from .ranks import check_ranks_agree, say, setup_distributed, teardown_distributed
from .trainer import Diverged, TrainSettings, sample_grid
from .workdir import (EMA_FILE, LOG_FILE, PLOT_FILE, SAMPLES_DIR, STATE_FILE, default_workdir, divergence_message,
                      final_path, interruption_message, removed_if_left_empty)

# torch, numpy, the model and the objective take seconds to import, so each function imports what it uses (here
# and in prepare, trainer, workdir and ranks): main() then catches a Ctrl-C during those seconds (one line, not a
# traceback), and --help answers at once.


non_negative_int = checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
decay_float = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


# What a --resume may change: none of it changes the trained numbers (--threads, --accum, the world size
# and the device only their float rounding: the same command on the same machine resumes bit-identically).
# Everything else is in the settings record (training_record).
FREE_ON_RESUME = ("--until, --out, --ckpt-every, --sample-every, --metadata, --device, --threads, --accum, "
                  "--grad-checkpoint, --compile, --cache-dir and the number of ranks; --init may be left out (a "
                  "resume never reads it); a larger --steps extends the run (its learning-rate schedule then spans "
                  "the new count, which is said)")


def user_error(message: str) -> NoReturn:
    """A mistake the user can fix: one line on stderr, exit status 2 (before any training)."""
    print(f"ecar-train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> Parser:
    d = TrainSettings()
    p = Parser(prog="ecar-train", description=__doc__.split("\n\n")[0] + " Options may also be spelled with "
               "underscores (--batch_size).")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="ecar-digits32", choices=preset_names(), metavar="NAME",
                       help=f"model config preset: {', '.join(preset_names())} (docs/MODEL.md, \"Presets\"; "
                            f"latent models, which take --vae: ecar-b, -l, -xl and their variants at 256 px, "
                            f"ecar-tiny-vae at 32 px; default %(default)s)")
    model.add_argument("--config", help="a config JSON file instead of --preset (default: the preset)")
    model.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="change one config field, e.g. num_classes=5 or latent_channels=3 (repeatable; "
                            "default: none)")
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits32",
                      help="digits32 (the default), an .npz (uint8 `images` [N,H,W,C], `labels`, optional "
                           "`class_names`) or an image folder with one sub-folder per class: RGB for a 3-channel "
                           "config (grayscale images replicated), grayscale for a 1-channel one (color refused)")
    data.add_argument("--train-size", type=positive_int, default=None,
                      help="images in the digits32 train split (default: the whole split)")
    data.add_argument("--flip", action="store_true", help="random horizontal flips (default: off)")
    data.add_argument("--vae", help="latent (sd-vae) models: a local diffusers AutoencoderKL folder or .safetensors "
                                    "file; the data set is encoded once into the latent cache (default: none)")
    data.add_argument("--cache-dir", help="decoded images and latent caches (default <workdir>/cache); may be "
                                          "shared by runs on the same data")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=positive_int, default=d.steps,
                     help="training steps, which the learning-rate schedule spans (default %(default)s)")
    opt.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                     help="global batch over all ranks (default %(default)s)")
    opt.add_argument("--accum", type=positive_int, default=1,
                     help="micro-batches per step on each rank (gradient accumulation; default %(default)s)")
    opt.add_argument("--lr", type=positive_float, default=d.lr,
                     help=f"peak AdamW learning rate, then a cosine decay to {d.min_lr_ratio:g} of it "
                          f"(default %(default)s)")
    opt.add_argument("--warmup", type=non_negative_int, default=d.warmup,
                     help="steps of linear learning-rate warmup (default %(default)s)")
    opt.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay,
                     help="AdamW weight decay (default %(default)s)")
    opt.add_argument("--ema-decay", type=decay_float, default=d.ema_decay,
                     help="decay in [0, 1) of the EMA of the weights that the checkpoints hold (default %(default)s)")
    opt.add_argument("--stage-noise", choices=("independent", "tied"), default=d.stage_noise,   # objective.STAGE_NOISE
                     help="noise of the stages' training pairs: drawn independently, or tied so that each stage "
                          "starts where the sampler's jump from the previous stage's end puts it (docs/MODEL.md, "
                          "\"Training objective\"; default %(default)s)")
    opt.add_argument("--seed", type=seed_int, default=d.seed,
                     help="seed of the initial weights and of every random draw of training (default %(default)s)")
    run = p.add_argument_group("run")
    run.add_argument("--workdir", help="resume state, settings record, EMA checkpoint, loss log, samples (default "
                                       "runs/<data name>: runs/digits32, or runs/NAME for --data NAME/ or NAME.npz)")
    run.add_argument("--out", help="final EMA checkpoint (default <workdir>/final.safetensors)")
    run.add_argument("--ckpt-every", type=positive_int, default=100,
                     help="steps between resume states / EMA checkpoints (default %(default)s)")
    run.add_argument("--sample-every", type=non_negative_int, default=None,
                     help="steps between EMA sample grids in <workdir>/samples (default: --ckpt-every; 0: none)")
    run.add_argument("--resume", action="store_true",
                     help=f"continue the run in --workdir (its state.safetensors) if it holds one; the settings "
                          f"must be the run's, except {FREE_ON_RESUME} (default: a --workdir holding a run is "
                          f"refused)")
    run.add_argument("--until", type=positive_int,
                     help="stop after this step (the schedule still spans --steps) and write the EMA to "
                          "<workdir>/ema-step<N>.safetensors; continue later with --resume (default: --steps)")
    run.add_argument("--init", help="start from the weights of this checkpoint or shipped model (same "
                     "architecture; layers it lacks, such as a shortcut head's level MLP, keep their initialisation; "
                     "default: random initial weights)")
    run.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                     help="extra metadata for the final checkpoint, e.g. recommended_cfg=2.0 (repeatable; default: "
                          "none)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto, cpu or cuda (torchrun: the local rank's GPU; default %(default)s)")
    run.add_argument("--threads", type=positive_int,
                     help="CPU threads (torch.set_num_threads); 1 is fastest on a busy CPU (default: torch's)")
    run.add_argument("--grad-checkpoint", action="store_true",
                     help="recompute the trunk MLPs in the backward pass (less memory, large presets; default: off)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training objective (default: off)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked: a mistake is a user error (one line, status 2)."""
    try:
        return _checked_options(argv)
    except UsageError as err:
        user_error(str(err))


def _checked_options(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(normalize(sys.argv[1:] if argv is None else list(argv)))
    for option in ("metadata", "set"):
        if any("=" not in kv for kv in getattr(args, option)):
            p.error(f"--{option} takes KEY=VALUE")
    if args.until is not None and args.until > args.steps:
        p.error(f"--until {args.until} is beyond --steps {args.steps}: give an --until of at most --steps, or more "
                f"--steps")
    if args.device == "cuda" and not cuda_available():
        p.error("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    args.workdir = args.workdir or default_workdir(args.data)
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class StepOutputs:
    """What rank 0 writes after a step: at each checkpoint the EMA and the loss plot, sample grids, the
    final file at the last step, and the resume state last of all."""

    workdir: Path
    out: Path            # the final file (or ema-stepN.safetensors with --until)
    metadata: dict[str, str]
    decoder: object
    ckpt_every: int
    sample_every: int    # 0: no grids

    def write(self, trainer, train_log, last: bool) -> None:
        checkpoint = trainer.step % self.ckpt_every == 0 or last
        if checkpoint:
            trainer.export_ema(self.workdir / EMA_FILE, self.metadata)   # samples as the grids and the final file do
            train_log.plot(self.workdir / PLOT_FILE)
        if self.sample_every and (trainer.step % self.sample_every == 0 or last):
            sample_grid(trainer, self.decoder, self.workdir / SAMPLES_DIR / f"step{trainer.step:07d}.png",
                        self.metadata)
        if last:
            trainer.export_ema(self.out, self.metadata)
        if checkpoint:   # last: the state marks the step done, so a stop before it redoes the step (exactly)
            trainer.save_state(self.workdir / STATE_FILE)   # on resume, and every file of the step is written again


def train(args: argparse.Namespace) -> None:
    import torch
    from tqdm.auto import tqdm

    from .log import TrainLog

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device, rank, world = setup_distributed(args.device)
    except UsageError as err:
        user_error(str(err))

    def log(message: str) -> None:
        if rank == 0:
            say(message)

    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             weight_decay=args.weight_decay, ema_decay=args.ema_decay, seed=args.seed,
                             stage_noise=args.stage_noise)
    try:
        with removed_if_left_empty(Path(args.workdir)):
            trainer, decoder, metadata = prepare(args, settings, device, rank, world, log)
    except KeyboardInterrupt:   # before user_errors(), whose imports must not run inside an interrupted import
        raise
    except (*user_errors(), ValueError, OSError) as err:
        user_error(str(err))
    workdir, data = Path(args.workdir), trainer.data
    if world > 1:
        try:
            check_ranks_agree(trainer, workdir)
        except UsageError as err:
            user_error(str(err))
    sample_every = args.ckpt_every if args.sample_every is None else args.sample_every
    train_log = TrainLog(workdir / LOG_FILE, trainer.step) if rank == 0 else None
    log(f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters, {data.description} "
        f"({len(data)} images), step {trainer.step}/{settings.steps}, world {world}, device {device}")
    from .data import class_counts

    log(f"classes: {class_counts(data.class_names, data.labels)}")
    if settings.warmup > settings.steps:   # a warmup as long as the run reaches --lr at its last step
        log(f"warning: --warmup {settings.warmup} is longer than --steps {settings.steps}, so the learning "
            f"rate never reaches --lr {settings.lr:g}; give fewer --warmup steps")
    stop = settings.steps if args.until is None else min(args.until, settings.steps)
    out = final_path(args) if stop == settings.steps else workdir / f"ema-step{stop}.safetensors"
    outputs = StepOutputs(workdir, out, metadata, decoder, args.ckpt_every, sample_every)
    with tqdm(total=settings.steps, initial=trainer.step, disable=rank != 0, unit="step", dynamic_ncols=True,
              mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:   # closed before an interruption's line
        while trainer.step < stop:
            started = time.perf_counter()
            lr = settings.lr_at(trainer.step)
            try:
                loss = trainer.train_step()
            except Diverged as err:
                bar.close()
                if rank == 0:
                    train_log.close()
                    print(f"ecar-train: error: {divergence_message(err, workdir, settings.lr)}", file=sys.stderr,
                          flush=True)
                raise SystemExit(EXIT_FAILED) from None
            seconds = time.perf_counter() - started
            images_per_s = settings.batch_size / seconds
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", avg=f"{trainer.loss_avg:.4f}", img_s=f"{images_per_s:.1f}",
                            refresh=False)
            if rank != 0:
                continue
            train_log.append(step=trainer.step, loss=loss, loss_avg=trainer.loss_avg, lr=lr, step_seconds=seconds,
                             images_per_s=images_per_s, tokens_per_s=images_per_s * trainer.tokens_per_image)
            outputs.write(trainer, train_log, last=trainer.step == stop)
    if rank == 0:
        train_log.close()
        log(f"wrote {out} (step {trainer.step}, mean loss of the last {len(trainer.recent_losses)} steps "
            f"{trainer.loss_avg:.5f})")
    if world > 1:
        teardown_distributed(trainer)


@stops_on_sigterm
def main(argv: list[str] | None = None) -> None:
    """ecar-train: user errors print one line and exit 2; Ctrl-C or SIGTERM prints one line (rank 0 alone under
    torchrun, where every rank gets the signal) saying how to continue, and exits 130."""
    keep_freed_memory()
    args = None
    try:   # from the start: the first seconds import torch
        with warnings_to_stderr("ecar-train", shown=launched_rank() == 0):
            args = parse_args(argv)
            train(args)
    except KeyboardInterrupt:
        if launched_rank() == 0:
            line = interruption_message(Path(args.workdir)) if args else "interrupted: nothing was written"
            print(f"ecar-train: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    main()
