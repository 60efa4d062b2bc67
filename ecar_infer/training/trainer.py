"""Reference trainer: the training objective of docs/MODEL.md ("Training objective"), AdamW, an EMA of the
weights (what ships), periodic and resumable checkpoints, and data parallel training with torchrun.

    ecar-train --preset ecar-digits32 --threads 1 --workdir runs/digits32 --out my-digits32.safetensors
    ecar-train --data my_images/ --preset ecar-emoji32 --set num_classes=5 --flip --workdir runs/mine
    ecar-train --data imagenet/train --vae sd-vae-ft-ema/ --preset ecar-b --flip --workdir runs/b
    torchrun --nproc_per_node 8 -m ecar_infer.training ...     # DistributedDataParallel, one GPU per rank

Data (ecar_infer/training/data.py): digits32, an .npz or an image folder; a latent (sd-vae) model trains
from a cache of VAE latents encoded once (ecar_infer/training/latents.py) and never runs the encoder.

Every random draw of a step (batch indices, per-stage noise, r, label drops, then the data's flips and
latent noise) comes from one CPU generator for the whole global batch, and rank k trains on rows
k, k+W, k+2W, ... of it (and reads only those rows of the data). A run is therefore the same for any
world size (up to float reduction order), and resuming needs one RNG state. Gradient accumulation
splits a rank's rows into equal micro-batches whose mean loss is the loss of the whole batch.

The resume state (<workdir>/state.safetensors) holds the model, the EMA, the AdamW moments and the
generator state as tensors, and the step in its metadata: safetensors only, no pickle. The work folder
also holds the EMA checkpoint (ema.safetensors), loss.csv and loss.png, and samples/stepNNNNNNN.png,
grids of EMA samples, one row per class (for 10 evenly spaced classes when there are more).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_path
from ..class_names import METADATA_KEY as CLASS_NAMES_KEY
from ..class_names import encode_class_names, label_rows
from ..cli import positive_int
from ..config import ECARConfig
from ..cpu_memory import keep_freed_memory
from ..model import ECARModel
from ..registry import preset_names
from .objective import build_objective, draw_step

STATE_FILE = "state.safetensors"
EMA_FILE = "ema.safetensors"
LOG_FILE = "loss.csv"
PLOT_FILE = "loss.png"
SAMPLES_DIR = "samples"


# ---- the trainer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    # defaults: the first leg of the shipped weights/ecar-digits32.safetensors (its card has the warm restart)
    steps: int = 3000
    batch_size: int = 64            # global batch, split over the ranks
    lr: float = 1e-3
    warmup: int = 50                # linear warmup steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def ema_decay_at(self, step: int) -> float:
        """The EMA warms up: an early EMA follows the weights closely."""
        return min(self.ema_decay, (1 + step) / (10 + step))


class Trainer:
    """One rank's training state: model, EMA, AdamW, the shared step generator, the step counter.

    data: PixelBatches or LatentBatches (len, labels, class_names, description, draw(gen, G), x0(index, draws)).
    accum: micro-batches per step on each rank; grad_checkpoint: recompute each trunk block's MLP in the
    backward pass instead of storing its activations; compile: torch.compile the objective.
    """

    def __init__(self, config: ECARConfig, settings: TrainSettings, data, device: torch.device, rank: int = 0,
                 world: int = 1, accum: int = 1, grad_checkpoint: bool = False, compile: bool = False) -> None:
        if settings.batch_size % (world * accum):
            raise ValueError(f"the batch size {settings.batch_size} must be divisible by the world size {world} "
                             f"times the gradient accumulation {accum}")
        self.config, self.settings, self.data = config, settings, data
        self.device, self.rank, self.world, self.accum = device, rank, world, accum
        self.model = ECARModel(config).init_weights(settings.seed, zero_init=True).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        if grad_checkpoint:
            checkpoint_mlps(self.model)
        self.objective = build_objective(self.model, self.ema)
        self.forward = self.objective   # what a step calls: the objective, wrapped in DDP and/or compiled
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.objective,
                                                   device_ids=[device.index] if device.type == "cuda" else None)
        if compile:
            self.forward = torch.compile(self.forward)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, betas=(0.9, 0.99),
                                           weight_decay=settings.weight_decay)
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.loss_avg = float("nan")   # running mean of the loss (the last ~100 steps)

    @property
    def tokens_per_image(self) -> int:
        return sum(self.model.plan.tokens)

    def _no_sync(self, last: bool):
        """DDP all-reduces the gradients only in the last micro-batch's backward."""
        ddp = getattr(self.forward, "_orig_mod", self.forward)
        return ddp.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def train_step(self) -> float:
        s = self.settings
        draws = draw_step(self.gen, self.model.plan, len(self.data), s.batch_size)
        data_draws = self.data.draw(self.gen, s.batch_size)   # after the objective's draws, same generator
        draws, data_draws = draws.shard(self.rank, self.world), data_draws.shard(self.rank, self.world)
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for m in range(self.accum):
            micro, micro_data = draws.shard(m, self.accum), data_draws.shard(m, self.accum)
            x0 = self.data.x0(micro.index, micro_data).to(self.device, non_blocking=True)
            labels = self.data.labels[micro.index].to(self.device)
            with self._no_sync(m == self.accum - 1):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    loss = self.forward(x0, labels, micro.to(self.device)) / self.accum
                loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            decay = s.ema_decay_at(self.step)
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        value = total.item()
        self.loss_avg = value if math.isnan(self.loss_avg) else 0.99 * self.loss_avg + 0.01 * value
        self.step += 1
        return value

    # ---- resume state ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for name, p in self.model.named_parameters():
            st = self.optimizer.state.get(p)
            if st:
                out[f"adamw.exp_avg.{name}"] = st["exp_avg"]
                out[f"adamw.exp_avg_sq.{name}"] = st["exp_avg_sq"]
                out[f"adamw.step.{name}"] = st["step"].reshape(1)
        out["rng"] = self.gen.get_state()
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save_state(self, path: Path) -> None:
        from safetensors.torch import save_file

        meta = {"step": str(self.step), "loss_avg": repr(self.loss_avg), "config": self.config.to_json(),
                "settings": json.dumps(self.settings.__dict__, sort_keys=True)}
        with atomic_path(path) as tmp:  # never leave a half-written state behind
            save_file(self.state_tensors(), str(tmp), metadata=meta)

    def load_state(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if ECARConfig.from_json(meta["config"]) != self.config:
            raise ValueError(f"{path} was trained with a different config; start a new --workdir")
        strip = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        self.model.load_state_dict(strip("model."))
        self.ema.load_state_dict(strip("ema."))
        opt_state = self.optimizer.state_dict()
        opt_state["state"] = {
            i: {"step": tensors[f"adamw.step.{name}"].reshape(()), "exp_avg": tensors[f"adamw.exp_avg.{name}"],
                "exp_avg_sq": tensors[f"adamw.exp_avg_sq.{name}"]}
            for i, (name, _) in enumerate(self.model.named_parameters()) if f"adamw.step.{name}" in tensors}
        self.optimizer.load_state_dict(opt_state)
        self.gen.set_state(tensors["rng"])
        self.step, self.loss_avg = int(meta["step"]), float(meta["loss_avg"])

    def init_from(self, path: Path) -> None:
        """Copy the weights of a checkpoint into the model and the EMA; tensors the checkpoint lacks (new
        layers, e.g. the level MLP that turns a flow head into a shortcut head) keep their init."""
        from ..checkpoint import load_checkpoint

        source = load_checkpoint(path, device=self.device).state_dict()
        own = self.model.state_dict()
        misfit = [k for k, v in source.items() if k not in own or own[k].shape != v.shape]
        if misfit:
            raise ValueError(f"--init {path} does not fit this config: {misfit[:5]}")
        for module in (self.model, self.ema):
            module.load_state_dict(source, strict=False)

    def training_metadata(self) -> dict[str, str]:
        return {"training_data": f"{self.data.description}, {len(self.data)} images",
                CLASS_NAMES_KEY: encode_class_names(self.data.class_names, self.config.num_classes),
                "training_steps": str(self.step), "training_batch_size": str(self.settings.batch_size),
                "training_final_loss": f"{self.loss_avg:.5f}", "training_settings": json.dumps(
                    self.settings.__dict__, sort_keys=True)}

    def export_ema(self, path: Path, extra: dict[str, str] | None = None) -> None:
        from ..checkpoint import save_checkpoint

        save_checkpoint(self.ema, str(path), extra_metadata={**self.training_metadata(), **(extra or {})})


def checkpoint_mlps(model: ECARModel) -> None:
    """Activation checkpointing for large presets: each trunk block's MLP (its 4x-wide hidden layer, the
    largest activation of a block) is recomputed in the backward pass instead of being stored."""
    from torch.utils.checkpoint import checkpoint

    for block in model.trunk.blocks:
        block.mlp = functools.partial(checkpoint, block.mlp, use_reentrant=False)


def sample_grid(trainer: Trainer, decoder, path: Path, metadata: dict[str, str], per_class: int = 8,
                max_rows: int = 10) -> None:
    """A PNG of EMA samples: one labelled row per class (up to max_rows classes, evenly spaced), at the
    sampling settings the --metadata gives (the sampler's defaults otherwise), seeds 0, 1, ..."""
    from ..output import make_grid, save_image
    from ..defaults import SamplingDefaults
    from ..sampler import Sampler

    num_classes = trainer.config.num_classes
    classes = np.linspace(0, num_classes - 1, min(max_rows, num_classes)).round().astype(int).tolist()
    sampler = Sampler(copy.deepcopy(trainer.ema), decoder, SamplingDefaults.from_metadata(metadata, trainer.config),
                      cuda_graphs=False, progress=False)
    labels = [c for c in classes for _ in range(per_class)]
    images = sampler.generate(labels, seed=0, output_type="np").images
    grid = make_grid(images, columns=per_class)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(label_rows(grid, [trainer.data.class_names[c] for c in classes], images.shape[1]), path)


# ---- command line ----------------------------------------------------------------------------
def user_error(message: str) -> NoReturn:
    """A mistake the user can fix: one line on stderr, exit status 2 (before any training)."""
    print(f"ecar-train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # argparse's own errors too: one line, status 2
        user_error(f"{message} (see ecar-train --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = TrainSettings()
    p = Parser(prog="ecar-train", description=__doc__.split("\n\n")[0])
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="ecar-digits32", choices=preset_names(), metavar="NAME",
                       help="model config preset (ecar_infer.registry)")
    model.add_argument("--config", help="a config JSON file instead of --preset")
    model.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="change one config field, e.g. num_classes=5 or latent_channels=3 (repeatable)")
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits32",
                      help="digits32, an .npz (uint8 `images` [N,H,W,C], `labels`, optional `class_names`) or an "
                           "image folder with one sub-folder per class")
    data.add_argument("--train-size", type=int, default=None, help="images in the digits32 train split")
    data.add_argument("--flip", action="store_true", help="random horizontal flips")
    data.add_argument("--vae", help="latent (sd-vae) models: a local diffusers AutoencoderKL folder or .safetensors "
                                    "file; the data set is encoded once into the latent cache")
    data.add_argument("--cache-dir", help="decoded images and latent caches (default <workdir>/cache); may be "
                                          "shared by runs on the same data")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=positive_int, default=d.steps)
    opt.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="global batch over all ranks")
    opt.add_argument("--accum", type=positive_int, default=1,
                     help="micro-batches per step on each rank (gradient accumulation)")
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--warmup", type=int, default=d.warmup)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--ema-decay", type=float, default=d.ema_decay)
    opt.add_argument("--seed", type=int, default=d.seed)
    run = p.add_argument_group("run")
    run.add_argument("--workdir", default="runs/digits32", help="resume state, EMA checkpoint, loss log, samples")
    run.add_argument("--out", help="final EMA checkpoint (default <workdir>/final.safetensors)")
    run.add_argument("--ckpt-every", type=positive_int, default=100,
                     help="steps between resume states / EMA checkpoints")
    run.add_argument("--sample-every", type=int, default=None,
                     help="steps between EMA sample grids in <workdir>/samples (default: --ckpt-every; 0: none)")
    run.add_argument("--resume", action="store_true", help="continue from <workdir>/state.safetensors if present")
    run.add_argument("--until", type=positive_int,
                     help="stop after this step (the schedule still spans --steps) and write the EMA to "
                          "<workdir>/ema-step<N>.safetensors; continue later with --resume")
    run.add_argument("--init", help="start from this checkpoint's weights (same architecture; layers it lacks, such "
                     "as a shortcut head's level MLP, keep their initialisation)")
    run.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                     help="extra metadata for the final checkpoint, e.g. recommended_cfg=2.0 (repeatable)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto, cpu or cuda (torchrun: the local rank's GPU)")
    run.add_argument("--threads", type=positive_int,
                     help="CPU threads (torch.set_num_threads); 1 is fastest on a busy CPU")
    run.add_argument("--grad-checkpoint", action="store_true",
                     help="recompute the trunk MLPs in the backward pass (less memory, large presets)")
    run.add_argument("--compile", action="store_true", help="torch.compile the training objective")
    args = p.parse_args(argv)
    for option in ("metadata", "set"):
        if any("=" not in kv for kv in getattr(args, option)):
            p.error(f"--{option} takes KEY=VALUE")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    return args


def check_metadata(metadata: dict[str, str], config: ECARConfig, out: Path) -> None:
    """Refuse --metadata entries the checkpoint writer would refuse at the end of the run, now."""
    from ..checkpoint import CheckpointError, metadata_entries

    try:
        metadata_entries(out, config, metadata)
    except CheckpointError as err:
        raise ValueError(f"--metadata: {err.problem}; fix or drop that entry") from None


def build_config(args: argparse.Namespace) -> ECARConfig:
    """--preset or --config, then each --set FIELD=VALUE (the value read as JSON, else as a string)."""
    config = ECARConfig.from_json(Path(args.config).read_text()) if args.config else ECARConfig.preset(args.preset)
    changes = {}
    for kv in args.set:
        field, value = kv.split("=", 1)
        try:
            changes[field] = json.loads(value)
        except ValueError:
            changes[field] = value
    return ECARConfig.from_dict({**config.to_dict(), **changes}) if changes else config


def open_training_data(args: argparse.Namespace, config: ECARConfig, device: torch.device, cache_dir: Path,
                       log) -> tuple[object, ECARConfig, object]:
    """(training batches, the config, the decoder for sample grids). A latent model's config takes the
    VAE's scaling factor; its data set is encoded into the latent cache first (once)."""
    from ..vae import IdentityDecoder, build_decoder, load_autoencoder
    from .data import PixelBatches, open_data
    from .latents import LatentBatches, latent_moments

    if config.latent_kind == "pixel":
        if args.vae:
            raise ValueError("--vae: this is a pixel-space config, it needs no VAE")
        images = open_data(args.data, config, cache_dir, train_size=args.train_size)
        return PixelBatches(images, args.flip), config, IdentityDecoder()
    if not args.vae:
        raise ValueError(f"a {config.latent_kind} config trains on VAE latents: give --vae PATH (a local diffusers "
                         f"AutoencoderKL folder or .safetensors file)")
    vae = load_autoencoder(args.vae)
    scaling = float(vae.config.scaling_factor)
    if scaling != config.vae_scaling_factor:
        log(f"vae_scaling_factor {config.vae_scaling_factor} -> {scaling} (the VAE's)")
        config = config.replace(vae_scaling_factor=scaling)
    decoder = build_decoder(config, vae, device=device)   # checks the latent channels and downsampling
    images = open_data(args.data, config, cache_dir, channels=vae.config.in_channels, train_size=args.train_size)

    def report(done: int, total: int) -> None:
        log(f"latent cache: {done}/{total} images encoded")

    moments = latent_moments(images, decoder.vae, args.flip, cache_dir, report=report)
    return LatentBatches(moments, images, scaling), config, decoder


def setup_distributed(device_arg: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the process group when torchrun started several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if world == 1:
        return torch.device("cuda" if cuda else "cpu"), 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu"), dist.get_rank(), world


def teardown_distributed(trainer: Trainer) -> None:
    """Leave the process group cleanly: every rank waits for the others (rank 0 may still be
    writing), then DDP's reducer is released before the group is destroyed, so no gloo work object
    outlives the group into interpreter shutdown (a known source of SIGABRT at exit)."""
    dist.barrier()
    trainer.forward = trainer.objective
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..vae import VAEError
    from .log import TrainLog

    keep_freed_memory()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, rank, world = setup_distributed(args.device)

    def log(message: str) -> None:
        if rank == 0:
            print(f"ecar-train: {message}", flush=True)

    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             weight_decay=args.weight_decay, ema_decay=args.ema_decay, seed=args.seed)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    final = Path(args.out) if args.out else workdir / "final.safetensors"
    metadata = dict(kv.split("=", 1) for kv in args.metadata)
    try:
        config = build_config(args)
        check_metadata(metadata, config, final)
        data, config, decoder = open_training_data(args, config, device, Path(args.cache_dir or workdir / "cache"), log)
        trainer = Trainer(config, settings, data, device, rank, world, args.accum, args.grad_checkpoint, args.compile)
        state_path = workdir / STATE_FILE
        if args.resume and state_path.exists():
            trainer.load_state(state_path)
        elif args.init:
            trainer.init_from(Path(args.init))
    except (ValueError, OSError, VAEError, ConfigError, CheckpointError) as err:
        user_error(str(err))
    sample_every = args.ckpt_every if args.sample_every is None else args.sample_every
    train_log = TrainLog(workdir / LOG_FILE, trainer.step) if rank == 0 else None
    log(f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters, {data.description} "
        f"({len(data)} images), step {trainer.step}/{settings.steps}, world {world}, device {device}")
    stop = settings.steps if args.until is None else min(args.until, settings.steps)
    bar = tqdm(total=settings.steps, initial=trainer.step, disable=rank != 0, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    while trainer.step < stop:
        started = time.perf_counter()
        lr = settings.lr_at(trainer.step)
        loss = trainer.train_step()
        seconds = time.perf_counter() - started
        images_per_s = settings.batch_size / seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{trainer.loss_avg:.4f}", img_s=f"{images_per_s:.1f}",
                        refresh=False)
        if rank != 0:
            continue
        train_log.append(step=trainer.step, loss=loss, loss_avg=trainer.loss_avg, lr=lr, step_seconds=seconds,
                         images_per_s=images_per_s, tokens_per_s=images_per_s * trainer.tokens_per_image)
        last = trainer.step == stop
        if trainer.step % args.ckpt_every == 0 or last:
            trainer.save_state(workdir / STATE_FILE)
            trainer.export_ema(workdir / EMA_FILE)
            train_log.plot(workdir / PLOT_FILE)
        if sample_every and (trainer.step % sample_every == 0 or last):
            sample_grid(trainer, decoder, workdir / SAMPLES_DIR / f"step{trainer.step:07d}.png", metadata)
    bar.close()
    if rank == 0:
        train_log.close()
        out = final if stop == settings.steps else workdir / f"ema-step{trainer.step}.safetensors"
        trainer.export_ema(out, metadata)
        log(f"wrote {out} (step {trainer.step}, loss {trainer.loss_avg:.5f})")
    if world > 1:
        teardown_distributed(trainer)


if __name__ == "__main__":
    main()
