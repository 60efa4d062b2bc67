"""Everything ecar-train checks before its first step (ecar_infer/training/train_cli.py): the outputs, the
work folder's run against --resume, the config, --metadata, --init, the batch split and the data, the
cheap checks before the data opens (which may take hours); then the trainer, at its start or resumed
step."""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from ..checks import read_record
from ..command import UsageError
from ..config import ConfigError, ECARConfig
from ..weights import checkpoint_path, shipped_models
from .ranks import say
from .trainer import Trainer, TrainSettings, check_batch_split, check_init_fits
from .workdir import (SETTINGS_FILE, STATE_FILE, check_outputs, check_same_run, final_path, recorded_settings,
                      recorded_vae_id, training_record, saved_step, unreadable_state)

# torch takes seconds to import: each function imports what it uses (ecar_infer/training/train_cli.py says why)


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator"   # in torch's message when a CPU allocation fails (a RuntimeError)


def prepare(args: argparse.Namespace, settings: TrainSettings, device: torch.device, rank: int,
            world: int, log) -> tuple[Trainer, object, dict[str, str]]:
    """(the trainer at its start or resumed step, the decoder for sample grids, the final metadata), or a
    user error: every check that can fail comes before the first step."""
    from ..targets import write_settings

    workdir, final = Path(args.workdir), final_path(args)
    check_outputs(workdir, final, args.data)
    step = saved_step(workdir / STATE_FILE)
    if step is not None and not args.resume:   # before the data: opening it may take hours
        raise UsageError(f"{workdir} holds a run at step {step}: pass --resume to continue it, or choose another "
                         f"--workdir (or delete {workdir})")
    if step is None and not args.resume and final.exists():   # another run's model, found before hours of training
        raise UsageError(f"--out {final} exists: a new run would replace it at its end; choose another --out, or "
                         f"delete it")
    if step is None and args.resume:   # how torchrun jobs are started too; said, in case --workdir is mistyped
        log(f"--resume: {workdir} holds no saved run; starting one")
    metadata = dict(kv.split("=", 1) for kv in args.metadata)
    config = build_config(args)
    check_trainable_size(config)
    check_metadata(metadata, config, final)
    # a resume never reads --init (the state holds the weights): it may be left out, and then the record's
    # init is kept; given, it must still be the run's (its file then must exist to be compared)
    if step is not None and args.init and not checkpoint_path(args.init).exists():
        raise UsageError(f"--init {args.init}: file not found; a --resume does not read it: leave --init out")
    init = init_path(args.init, config) if args.init and step is None else None
    init_unknown = ("init_sha256",) if step is not None and not args.init else ()
    check_batch_split(settings.batch_size, world, args.accum)   # before the data too
    if step is not None:   # before the data, whose decoding and encoding may take hours: all but what they decide
        check_same_run(workdir, training_record(args, config, settings),
                       unknown=("data", "config.vae_scaling_factor", *init_unknown))
    data, config, decoder = open_training_data(args, config, device, Path(args.cache_dir or workdir / "cache"), log,
                                               recorded_vae_id(workdir) if step is not None else None,
                                               functools.partial(say, rank=rank))
    trainer = Trainer(config, settings, data, device, rank, world, args.accum, args.grad_checkpoint, args.compile)
    record = training_record(args, config, settings, data)
    if step is not None:
        recorded_steps = check_same_run(workdir, record, unknown=init_unknown)
        if init_unknown:
            record["init_sha256"] = recorded_settings(workdir).get("init_sha256")
        load_resume_state(trainer, workdir / STATE_FILE)
        if settings.steps <= trainer.step:
            raise UsageError(f"--steps {settings.steps}: the run in {workdir} is already at step {trainer.step}; "
                             f"give more --steps to extend it")
        if recorded_steps is not None and recorded_steps != settings.steps:
            log(f"--steps {settings.steps}: the learning-rate schedule now spans {settings.steps} steps (the run "
                f"was started with --steps {recorded_steps}), from step {trainer.step}")
        if args.until is not None and trainer.step >= args.until:
            raise UsageError(f"--until {args.until}: the run in {workdir} is already at step {trainer.step}, "
                             f"nothing to do; give a later --until, or leave it out to finish at --steps "
                             f"{settings.steps}")
    elif init:
        note = trainer.init_from(init)
        if note:
            log(note)
    if rank == 0:
        write_settings(workdir / SETTINGS_FILE, record)
    return trainer, decoder, metadata


def load_resume_state(trainer: Trainer, state: Path) -> None:
    """trainer.load_state, its failures said as what they mean: a damaged file (delete it to start over) or too
    little memory (the file is sound and kept)."""
    import torch
    from safetensors import SafetensorError

    try:
        trainer.load_state(state)
    except KeyError as err:   # a damaged state: a tensor or metadata entry missing
        raise unreadable_state(state, f"it lacks {err}") from None
    except (torch.OutOfMemoryError, torch.AcceleratorError):   # RuntimeErrors of the device, not of the file:
        raise                                                     # the state is sound, never say to delete it
    except (ConfigError, RuntimeError, SafetensorError, TypeError) as err:   # a tensor of another shape, a config
        if CPU_OUT_OF_MEMORY in str(err):   # the CPU's out-of-memory is a plain RuntimeError: the state is sound
            raise UsageError(f"not enough memory to load the resume state {state} "
                             f"({' '.join(str(err).split())[:200]}); it is kept: resume where more memory is "
                             f"free") from None
        raise unreadable_state(state, err) from None


def build_config(args: argparse.Namespace) -> ECARConfig:
    """--preset or --config, then each --set FIELD=VALUE (the value read as JSON, else as a string)."""
    config = (ECARConfig.from_json(read_record(args.config, pipes=True)) if args.config
              else ECARConfig.preset(args.preset))
    changes = {}
    for kv in args.set:
        field, value = kv.split("=", 1)
        try:
            changes[field] = json.loads(value)
        except ValueError:
            changes[field] = value
    return ECARConfig.from_dict({**config.to_dict(), **changes}) if changes else config


# What a config may ask ecar-train to build: far beyond ecar-xl (729M weights in 322 tensors), and
# beyond what one GPU holds with AdamW's two moments; it catches a typo (--set depth=10000000) at once, which
# built for minutes and gigabytes before it failed
MAX_TRAIN_WEIGHTS, MAX_TRAIN_TENSORS = 20_000_000_000, 10_000


def check_trainable_size(config: ECARConfig) -> None:
    """Refuse, before the data, a config larger than MAX_TRAIN_WEIGHTS or MAX_TRAIN_TENSORS: counted by
    building it on the meta device, stopped as soon as it passes either."""
    from ..meta_build import BuildError, build_bounded
    from ..model import ECARModel

    too_large = (f"the config asks for a model of more than {MAX_TRAIN_WEIGHTS:,} weights or {MAX_TRAIN_TENSORS:,} "
                 f"tensors (ecar-xl has under 1,000,000,000 and 400)")
    try:
        build_bounded(lambda: ECARModel(config), MAX_TRAIN_TENSORS, MAX_TRAIN_WEIGHTS, too_large, "the config")
    except BuildError as err:
        raise UsageError(f"{err}; check --set and --config") from None


def check_metadata(metadata: dict[str, str], config: ECARConfig, out: Path) -> None:
    """Refuse --metadata entries the checkpoint writer would refuse at the end of the run, now: a bad value, or
    a key one typo away from an entry the sampler reads."""
    from ..checkpoint import CheckpointError, metadata_entries

    try:
        metadata_entries(out, config, metadata)
    except CheckpointError as err:
        raise ValueError(f"--metadata: {err.problem}; fix or drop that entry") from None


def init_path(spec: str, config: ECARConfig) -> Path:
    """The checkpoint --init names (a file or a shipped model), refused now if there is none or it does not fit
    `config`: before the data, whose opening may take hours."""
    path = checkpoint_path(spec)
    if not path.exists():
        raise UsageError(f"--init {spec}: file not found; give a checkpoint file or the name of a shipped model "
                         f"({', '.join(shipped_models())})")
    check_init_fits(path, config)
    return path


def open_training_data(args: argparse.Namespace, config: ECARConfig, device: torch.device, cache_dir: Path,
                       log, resumed_vae_id: str | None = None, progress=None) -> tuple[object, ECARConfig, object]:
    """(training batches, the config, the decoder for sample grids). A latent model's config takes the
    VAE's scaling factor; its data set is encoded into the latent cache first (once). A resume whose run
    was encoded by another VAE than --vae (resumed_vae_id) is refused before any image is encoded.
    progress: where a cache build reports (default `log`): whichever rank builds a cache, the others wait."""
    progress = progress or log
    from ..vae import IdentityDecoder, VAEError, build_decoder, load_autoencoder
    from .data import PixelBatches, open_data
    from .latents import LatentBatches, latent_moments, vae_fingerprint
    from .log import PROGRESS_SECONDS, at_most_every

    decoded = at_most_every(PROGRESS_SECONDS, lambda done, total: progress(
        f"image cache: {done:,}/{total:,} images decoded ({100 * done // total}%)"))

    if config.latent_kind == "pixel":
        if args.vae:
            raise ValueError("--vae: this is a pixel-space config, it needs no VAE")
        images = open_data(args.data, config, cache_dir, train_size=args.train_size, report=decoded)
        return PixelBatches(images, args.flip), config, IdentityDecoder()
    if not args.vae:
        raise ValueError(f"a {config.latent_kind} config trains on VAE latents: give --vae PATH (a local diffusers "
                         f"AutoencoderKL folder or .safetensors file)")
    vae = load_autoencoder(args.vae)
    vae_id = vae_fingerprint(vae)
    if resumed_vae_id is not None and vae_id != resumed_vae_id == vae_fingerprint(vae, before_2026_12_07=True):
        vae_id = resumed_vae_id   # the same VAE, recorded by the old fingerprint: the run and its cache keep it
    if resumed_vae_id is not None and vae_id != resumed_vae_id:
        raise UsageError(f"--vae {args.vae}: the run being resumed was trained on the latents of another VAE "
                         f"(fingerprint {resumed_vae_id}, this one's is {vae_id}); resume with the VAE it used, "
                         f"or choose another --workdir")
    scaling = float(vae.config.scaling_factor)
    if scaling != config.vae_scaling_factor:
        log(f"vae_scaling_factor {config.vae_scaling_factor} -> {scaling} (the VAE's)")
        config = config.replace(vae_scaling_factor=scaling)
    try:
        decoder = build_decoder(config, vae, device=device)   # checks the latent channels and downsampling
    except VAEError as err:
        raise UsageError(f"--vae {args.vae}: {err}; train a config that fits the VAE (--set latent_channels=C "
                         f"--set vae_downsample=D, the VAE's)") from None
    images = open_data(args.data, config, cache_dir, channels=vae.config.in_channels, train_size=args.train_size,
                       report=decoded)

    encoded = at_most_every(PROGRESS_SECONDS, lambda done, total: progress(
        f"latent cache: {done:,}/{total:,} images encoded ({100 * done // total}%)"))

    moments = latent_moments(images, decoder.vae, args.flip, cache_dir, report=encoded, vae_id=vae_id)
    return LatentBatches(moments, images, scaling, vae_id), config, decoder
