"""Reference trainer: the training objective of docs/MODEL.md ("Training objective"), AdamW, an EMA of the
weights (what ships), periodic and resumable checkpoints, and data parallel training with torchrun.

    ecar-train --preset ecar-digits32 --threads 1 --out my-digits32.safetensors      # work folder runs/digits32
    ecar-train --data my_images/ --preset ecar-emoji32-attn-sc --set depth=8 --set num_classes=5 --flip
    ecar-train --data imagenet/train --vae sd-vae-ft-ema/ --preset ecar-b --flip --workdir runs/b
    torchrun --nproc_per_node 8 -m ecar_infer.training ...     # DistributedDataParallel, one GPU per rank

Data (ecar_infer/training/data.py): digits32, an .npz or an image folder; a latent (sd-vae) model trains
from a cache of VAE latents encoded once (ecar_infer/training/latents.py) and never runs the encoder.

Every random draw of a step (batch indices, per-stage noise, r, label drops, then the data's flips and
latent noise) comes from one CPU generator for the whole global batch, and rank k trains on rows
k, k+W, k+2W, ... of it (and reads only those rows of the data). A run is therefore the same for any
world size (up to float reduction order), and resuming needs one RNG state. Gradient accumulation
splits a rank's rows into equal micro-batches whose mean loss is the loss of the whole batch.

The work folder (--workdir, default runs/<data name>) belongs to one run: a command that finds a run's
state there continues it with --resume and is refused without it, and a --resume whose settings differ
from the run's record (<workdir>/settings.json: the config, the data's identity, the optimisation
settings; run_settings) is refused, naming them. Errors the user can fix (options, data, unwritable
outputs) print one line and exit with status 2 before any training; Ctrl-C prints the step of the last
saved state and exits with status 130.

The resume state (<workdir>/state.safetensors) holds the model, the EMA, the AdamW moments and the
generator state as tensors, and the step in its metadata: safetensors only, no pickle. The work folder
also holds the EMA checkpoint (ema.safetensors), loss.csv and loss.png, and samples/stepNNNNNNN.png,
grids of EMA samples, one row per class (for 10 evenly spaced classes when there are more).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..atomic import atomic_path
from ..class_names import METADATA_KEY as CLASS_NAMES_KEY
from ..class_names import encode_class_names, label_rows
from ..checks import open_regular, parse_json, read_record, some_of
from ..cli import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, UsageError, check_writable_file,
                   check_writable_folder, checked, content_sha256, make_folder, normalize, positive_int, seed_int,
                   stops_on_sigterm, user_errors)
from ..config import ConfigError, ECARConfig
from ..cpu_memory import keep_freed_memory
from ..distributed import launched_rank
from ..registry import preset_names
from ..weights import checkpoint_path, shipped_models

# torch, numpy, the model and the objective take seconds to import, so each function imports what it uses:
# main() then catches a Ctrl-C during those seconds (one line, not a traceback), and --help answers at once.

STATE_FILE = "state.safetensors"
EMA_FILE = "ema.safetensors"
LOG_FILE = "loss.csv"
PLOT_FILE = "loss.png"
SAMPLES_DIR = "samples"
SETTINGS_FILE = "settings.json"   # the record of what decides the trained numbers (run_settings)
LOSS_WINDOW = 100   # the steps whose losses loss_avg averages


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
    stage_noise: str = "independent"   # objective.STAGE_NOISE: how the stages' noise draws relate

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

    data: PixelBatches or LatentBatches (len, labels, class_names, description, identity(), draw(gen, G),
    x0(index, draws)).
    accum: micro-batches per step on each rank; grad_checkpoint: recompute each trunk block's MLP in the
    backward pass instead of storing its activations; compile: torch.compile the objective.
    loss_avg (the log's loss_avg, the final line, the checkpoint's training_final_loss) is the mean loss of
    the last LOSS_WINDOW steps (of every step, before that many); the resume state holds those losses, so a
    resumed run reports what an uninterrupted one does.
    """

    def __init__(self, config: ECARConfig, settings: TrainSettings, data, device: torch.device, rank: int = 0,
                 world: int = 1, accum: int = 1, grad_checkpoint: bool = False, compile: bool = False) -> None:
        import torch

        from ..model import ECARModel
        from .objective import build_objective

        check_batch_split(settings.batch_size, world, accum)
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

            # one stage: W_in (input_proj) feeds no stage, and DDP without unused-parameter detection fails
            # the second step ("Expected to have finished reduction in the prior iteration")
            self.forward = DistributedDataParallel(self.objective,
                                                   device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=config.num_stages == 1)
        if compile:
            self.forward = torch.compile(self.forward)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, betas=(0.9, 0.99),
                                           weight_decay=settings.weight_decay)
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.recent_losses = collections.deque(maxlen=LOSS_WINDOW)

    @property
    def loss_avg(self) -> float:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else math.nan

    @property
    def tokens_per_image(self) -> int:
        return sum(self.model.plan.tokens)

    def _no_sync(self, last: bool):
        """DDP all-reduces the gradients only in the last micro-batch's backward."""
        ddp = getattr(self.forward, "_orig_mod", self.forward)
        return ddp.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def train_step(self) -> float:
        import torch
        import torch.distributed as dist

        from .objective import draw_step

        s = self.settings
        draws = draw_step(self.gen, self.model.plan, len(self.data), s.batch_size, s.stage_noise)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            decay = s.ema_decay_at(self.step)
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        # one read of both; the gradients are all-reduced, so every rank sees the same norm and stops alike
        value, norm = torch.stack([total, grad_norm.to(total)]).tolist()
        if not (math.isfinite(value) and math.isfinite(norm)):   # before this step's files are written
            row = self._first_nonfinite_row(draws, data_draws)
            raise Diverged(self.step + 1, value, norm, None if row is None else self.data.source_of(row))
        self.recent_losses.append(value)
        self.step += 1
        return value

    def _first_nonfinite_row(self, draws, data_draws) -> int | None:
        """The first row of the data, over all ranks, whose x0 in this step was not finite (a damaged latent
        cache, which would read as a diverged run), or None. Called once a step has diverged, on every rank
        (the loss and gradient norm they compare are all-reduced)."""
        import torch
        import torch.distributed as dist

        rows = []
        for m in range(self.accum):
            micro, micro_data = draws.shard(m, self.accum), data_draws.shard(m, self.accum)
            finite = self.data.x0(micro.index, micro_data).flatten(1).isfinite().all(dim=1)
            rows += micro.index[~finite].tolist()
        first = torch.tensor(min(rows, default=len(self.data)), device=self.device)
        if self.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        return None if first.item() == len(self.data) else int(first.item())

    # ---- resume state ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        import torch

        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for name, p in self.model.named_parameters():
            st = self.optimizer.state.get(p)
            if st:
                out[f"adamw.exp_avg.{name}"] = st["exp_avg"]
                out[f"adamw.exp_avg_sq.{name}"] = st["exp_avg_sq"]
                out[f"adamw.step.{name}"] = st["step"].reshape(1)
        out["rng"] = self.gen.get_state()
        out["recent_losses"] = torch.tensor(list(self.recent_losses), dtype=torch.float64)   # exact: float32 values
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save_state(self, path: Path) -> None:
        from ..checkpoint import save_safetensors   # the same state is the same bytes

        meta = {"step": str(self.step), "loss_avg": repr(self.loss_avg), "config": self.config.to_json(),
                "settings": json.dumps(self.settings.__dict__, sort_keys=True)}
        with atomic_path(path) as tmp:  # never leave a half-written state behind
            save_safetensors(self.state_tensors(), tmp, meta)

    def load_state(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if ECARConfig.from_json(meta["config"]) != self.config:
            raise ValueError(f"{path} was trained with a different config; start a new --workdir")
        # values as a saved run holds them: a NaN moment made the first step write NaN weights everywhere
        integers = sorted(k for k, v in tensors.items() if k != "rng" and not v.is_floating_point())
        if integers:
            raise TypeError(f"{some_of(integers, 3)} hold integers where a run keeps floats")
        nonfinite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all())
        if nonfinite:
            raise TypeError(f"{some_of(nonfinite, 3)} hold NaN or infinite values, which no saved run does")
        strip = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        self.model.load_state_dict(strip("model."))
        self.ema.load_state_dict(strip("ema."))

        def moment(kind: str, name: str, param: torch.Tensor) -> torch.Tensor:   # AdamW would take any shape
            value = tensors[f"adamw.{kind}.{name}"]
            if value.shape != param.shape:
                raise RuntimeError(f"adamw.{kind}.{name} is {list(value.shape)}, its parameter {list(param.shape)}")
            return value

        opt_state = self.optimizer.state_dict()
        opt_state["state"] = {
            i: {"step": tensors[f"adamw.step.{name}"].reshape(()), "exp_avg": moment("exp_avg", name, p),
                "exp_avg_sq": moment("exp_avg_sq", name, p)}
            for i, (name, p) in enumerate(self.model.named_parameters()) if f"adamw.step.{name}" in tensors}
        self.optimizer.load_state_dict(opt_state)
        self.gen.set_state(tensors["rng"])
        self.step = int(meta["step"])
        # a state saved before the losses were kept has none: the mean then starts at the resumed step
        recent = tensors["recent_losses"].tolist() if "recent_losses" in tensors else []
        if not all(isinstance(loss, float) for loss in recent):   # else the first mean fails, steps later
            raise TypeError(f"recent_losses must be a list of losses, got a tensor of shape "
                            f"{list(tensors['recent_losses'].shape)}")
        self.recent_losses = collections.deque(recent, maxlen=LOSS_WINDOW)

    def init_from(self, path: Path) -> str | None:
        """Copy the weights of a checkpoint into the model and the EMA; tensors the checkpoint lacks (new
        layers, e.g. the level MLP that turns a flow head into a shortcut head) keep their init. From a
        checkpoint of other classes (a shipped model fine-tuned on new data), the classes' embeddings keep
        their init too and the null class's (the unguided branch) is copied; the line saying so is returned
        (None otherwise)."""
        from ..checkpoint import load_checkpoint

        check_init_fits(path, self.config)
        source = load_checkpoint(path, device=self.device).state_dict()
        theirs, note = source[CLASS_EMBEDDING], None
        if theirs.shape[0] != self.config.num_classes + 1:
            own = self.model.state_dict()[CLASS_EMBEDDING].clone()
            own[-1] = theirs[-1]   # the null class is the last row
            source[CLASS_EMBEDDING] = own
            note = (f"--init {path}: its {theirs.shape[0] - 1} classes are not this run's {self.config.num_classes}: "
                    f"the class embeddings start fresh, the null class's (unguided sampling) is the checkpoint's")
        for module in (self.model, self.ema):
            module.load_state_dict(source, strict=False)
        return note

    def training_metadata(self) -> dict[str, str]:
        return {"training_data": f"{self.data.description}, {len(self.data)} images",
                CLASS_NAMES_KEY: encode_class_names(self.data.class_names, self.config.num_classes),
                "training_steps": str(self.step), "training_batch_size": str(self.settings.batch_size),
                "training_final_loss": f"{self.loss_avg:.5f}", "training_settings": json.dumps(
                    self.settings.__dict__, sort_keys=True)}

    def export_ema(self, path: Path, extra: dict[str, str] | None = None) -> None:
        from ..checkpoint import save_checkpoint

        save_checkpoint(self.ema, str(path), extra_metadata={**self.training_metadata(), **(extra or {})})


CLASS_EMBEDDING = "trunk.class_emb.weight"   # [num_classes + 1, width]: an --init of other classes may differ


def check_init_fits(path: Path, config: ECARConfig) -> None:
    """Refuse an --init checkpoint with a tensor that a model of `config` lacks or shapes otherwise (the class
    embedding aside: Trainer.init_from), from the checkpoint's header and the model built on the meta device
    (no weights are read or allocated), so that a misfit is found before the data opens, which may take
    hours. The error names the tensors and the config fields in which the two differ."""
    import torch

    from ..checkpoint import read_checkpoint_header
    from ..model import ECARModel

    stored_config, stored = read_checkpoint_header(path)
    with torch.device("meta"):
        own = {name: tuple(t.shape) for name, t in ECARModel(config).state_dict().items()}
    other_classes = lambda name, shape: name == CLASS_EMBEDDING and own[name][1:] == tuple(shape)[1:]  # noqa: E731
    misfit = [misfit_line(name, shape, own.get(name)) for name, shape in stored.items()
              if own.get(name) != tuple(shape) and not other_classes(name, shape)]
    if misfit:
        more = f"; and {len(misfit) - 3} more" if len(misfit) > 3 else ""
        fields = [f"{k} {v!r} vs {getattr(config, k)!r}" for k, v in stored_config.to_dict().items()
                  if k != "num_classes" and getattr(config, k) != v]
        differ = f" (the checkpoint's config against this one: {', '.join(fields)})" if fields else ""
        raise ValueError(f"--init {path} does not fit this config: {'; '.join(misfit[:3])}{more}{differ}; give the "
                         f"config the checkpoint's values, or leave out --init")


def misfit_line(name: str, stored, own) -> str:
    """One tensor of an --init checkpoint that does not fit: its shape there and here (None: not in this
    config)."""
    if own is None:
        return f"{name} {list(stored)} is not in this config"
    return f"{name} is {list(stored)} in the checkpoint, {list(own)} in this config"


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
    import numpy as np

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
non_negative_int = checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
decay_float = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def say(message: str, rank: int = 0) -> None:
    """One line of news on stdout, naming the rank where it is not rank 0."""
    print(f"ecar-train: {message}" if rank == 0 else f"ecar-train: rank {rank}: {message}", flush=True)


class Diverged(Exception):
    """A step whose loss or gradient norm is not finite: the weights it updated are lost, and so would be
    every file written from them."""

    def __init__(self, step: int, loss: float, grad_norm: float, bad_data: str | None = None):
        super().__init__(f"step {step}: loss {loss}, gradient norm {grad_norm}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        self.bad_data = bad_data   # where the step's data itself was not finite, if it was


def diverged(err: Diverged, workdir: Path, lr: float) -> str:
    """The line printed when a run diverges: what was kept, and why --resume would not help."""
    try:
        saved = saved_step(workdir / STATE_FILE)
    except UsageError:   # a state damaged since it was read: not this step's doing, and not to be read now
        saved = None
    kept = ("nothing was saved before it" if saved is None else
            f"nothing of it was saved: the last saved state is step {saved} in {workdir / STATE_FILE}, with its EMA "
            f"in {workdir / EMA_FILE}")
    if err.bad_data:   # not the weights' doing: the same state trains on once the data is whole
        return (f"step {err.step} read data that is not finite ({err.bad_data}); {kept}. Delete that file and "
                f"--resume: the cache is built again")
    start_from = "" if saved is None else ", or with --init from the EMA"
    return (f"the run diverged at step {err.step} (loss {err.loss:g}, gradient norm {err.grad_norm:g}); {kept}. "
            f"--resume would diverge again at the same step: start a new run (another --workdir) with a lower "
            f"--lr than {lr:g}{start_from}")


def user_error(message: str) -> NoReturn:
    """A mistake the user can fix: one line on stderr, exit status 2 (before any training)."""
    print(f"ecar-train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # argparse's own errors too: one line, status 2
        user_error(f"{message} (see ecar-train --help)")


# What a --resume may change: none of it changes the trained numbers (--threads, --accum, the world size
# and the device only their float rounding: the same command on the same machine resumes bit-identically).
# Everything else is in the settings record (run_settings).
FREE_ON_RESUME = ("--until, --out, --ckpt-every, --sample-every, --metadata, --device, --threads, --accum, "
                  "--grad-checkpoint, --compile, --cache-dir and the number of ranks; --init may be left out (a "
                  "resume never reads it); a larger --steps extends the run (its learning-rate schedule then spans "
                  "the new count, which is said)")


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


def default_workdir(data: str) -> str:
    """runs/<data name>: the --data folder's name or file's stem (runs/digits32 for the built-in set)."""
    path = Path(data).resolve()
    return str(Path("runs") / (path.stem if path.is_file() else path.name))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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


def final_path(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path(args.workdir) / "final.safetensors"


def check_outputs(workdir: Path, final: Path, data: str) -> None:
    """Fail before any work if the work folder or the final checkpoint cannot be written, if the final
    checkpoint would replace one of the files the run keeps in its work folder, or if either lies inside the
    image folder --data (its sample grids and loss plot would become training images, and a resume would
    then find other data)."""
    folder = Path(data)
    if folder.is_file() and final.resolve() == folder.resolve():
        raise UsageError(f"--out {final} is the data set --data {data}: the final checkpoint would replace it; "
                         f"choose another file")
    if folder.is_dir():
        for option, path in (("--workdir", workdir), ("--out", final)):
            if path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents:
                default = (" (the default: runs/<data name> in the current folder)"
                           if option == "--workdir" and str(path) == default_workdir(data) else "")
                raise UsageError(f"{option} {path}{default} lies inside the image folder --data {data}, whose every "
                                 f"image is training data: give {option} outside it")
    for kept in (STATE_FILE, EMA_FILE):
        if final.resolve() == (workdir / kept).resolve():
            raise UsageError(f"--out {final}: that is the work folder's {kept}, which the run keeps writing; "
                             f"choose another file")
    make_folder(workdir, "--workdir")
    check_writable_folder(workdir)
    check_writable_file(final)


def saved_step(state: Path) -> int | None:
    """The step of the resume state `state` (from its metadata alone), None if there is none; a state that
    cannot be read is a user error (it is the work folder's, which the user can delete)."""
    if not state.exists():
        return None
    try:
        step = int(header_metadata(state)["step"])
        if step < 0:
            raise ValueError(f"its step {step} is negative")
        return step
    except (OSError, KeyError, ValueError) as err:
        raise unreadable_state(state, "no step in its metadata" if isinstance(err, KeyError) else err) from None


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator"   # in torch's message when a CPU allocation fails (a RuntimeError)


def unreadable_state(state: Path, why: str | Exception) -> UsageError:
    """The one-line error of a resume state that cannot be used (it is the work folder's, which the user can
    delete): `why`, or the error that says it, in one line."""
    why = " ".join(str(why).split())[:200]
    return UsageError(f"the resume state {state} cannot be read ({why}): delete it to start over, or choose "
                      f"another --workdir")


def header_metadata(path: Path) -> dict[str, str]:
    """The metadata of the .safetensors file `path`, from its header, in plain Python: saved_step also runs in
    the Ctrl-C handler, which may have interrupted the import of torch (safetensors' reader imports it again).
    ValueError if the file is not a whole safetensors file."""
    with open_regular(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        size = int.from_bytes(f.read(8), "little")
        if size > file_size - 8:   # a damaged length: read as is, an OverflowError or a MemoryError
            raise ValueError(f"its header length {size} is beyond the file's {file_size} bytes")
        header = parse_json(f.read(size))
    try:
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        metadata = header.get("__metadata__") or {}
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
                and all(type(end) is int for end in ends)):
            raise TypeError
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError("its header does not describe safetensors tensors") from None
    data_end = max(ends, default=0)
    if 8 + size + data_end != file_size:
        raise ValueError(f"it has {file_size} bytes where its header describes {8 + size + data_end}")
    return metadata


def check_batch_split(batch_size: int, world: int, accum: int) -> None:
    """Each rank's micro-batches must split the global batch evenly."""
    if batch_size % (world * accum):
        raise ValueError(f"the batch size {batch_size} must be divisible by the world size {world} times the "
                         f"gradient accumulation {accum}")


def run_settings(args: argparse.Namespace, config: ECARConfig, settings: TrainSettings, data=None) -> dict:
    """What decides the trained numbers, with every default resolved (spelling out a default is no
    change), for the settings record: a --resume must agree on all of it. Without `data`, all but the
    data's identity (what a resume can check before the data opens)."""
    record = {**{f"config.{k}": v for k, v in config.to_dict().items()}, **dataclasses.asdict(settings),
              "flip": args.flip, "init_sha256": content_sha256(checkpoint_path(args.init)) if args.init else None}
    return record if data is None else {**record, "data": data.identity()}


# settings added after runs were recorded without them: such a run trained with the value given here
SETTINGS_ADDED_SINCE = {"stage_noise": "independent"}


def check_same_run(workdir: Path, settings: dict, unknown: tuple[str, ...] = ()) -> int | None:
    """Refuse to resume the run in `workdir` with settings other than its record's, --steps aside (a run
    may be extended: the schedule then spans the new count), and `unknown` (settings not known yet); returns
    the recorded --steps. A state saved before the record was kept has none: it resumes (None), and the
    record is written then."""
    from ..targets import differing_settings, read_settings

    record = workdir / SETTINGS_FILE
    if not record.exists():
        return None
    try:
        saved = read_settings(record)
    except (OSError, ValueError) as err:
        raise UsageError(f"{record} cannot be read ({err}); delete it to resume with this command's settings") from None
    saved = {**SETTINGS_ADDED_SINCE, **saved}
    differ = [name for name in differing_settings(saved, settings) if name not in ("steps", *unknown)]
    if differ:
        named = [what_differs(name, saved.get(name), settings.get(name)) for name in differ]
        raise UsageError(f"{workdir} holds a run with other settings ({', '.join(named)}): resume it with the "
                         f"settings in {record}, choose another --workdir, or delete {workdir}")
    return saved.get("steps")


def what_differs(name: str, saved, now) -> str:
    """A differing setting as a refused resume names it: the data with what in it differs (its image count
    with both values), the --init checkpoint with what to do (a shipped model updated since the run began
    refused the command that Ctrl-C says to rerun), everything else by its name."""
    if name == "init_sha256":
        return "init_sha256: the --init checkpoint is not the one the run began from, and a resume does not read it: " \
               "leave --init out"
    if name != "data" or not isinstance(saved, dict) or not isinstance(now, dict):
        return name
    parts = [f"images {saved.get(key)} in the run, {now.get(key)} now" if key == "images" else key
             for key in sorted(saved.keys() | now.keys()) if saved.get(key) != now.get(key)]
    return f"data: {', '.join(parts)}"


INTERRUPTED_BEFORE_ANY_STATE = ("interrupted before any state was saved; rerun the same command to start again (a "
                                "data cache it was building goes on from where it stopped)")


def interrupted(workdir: Path) -> str:
    """The line printed when Ctrl-C stops a run: where it can be continued from."""
    try:
        step = saved_step(workdir / STATE_FILE)
    except UsageError as err:   # a damaged state: said, not a traceback from inside the handler
        return f"interrupted; {err}"
    if step is None:
        return INTERRUPTED_BEFORE_ANY_STATE
    return (f"interrupted; the last saved state is step {step} in {workdir / STATE_FILE}: rerun the same command "
            f"with --resume to continue it")


def init_path(spec: str, config: ECARConfig) -> Path:
    """The checkpoint --init names (a file or a shipped model), refused now if there is none or it does not fit
    `config`: before the data, whose opening may take hours."""
    path = checkpoint_path(spec)
    if not path.exists():
        raise UsageError(f"--init {spec}: file not found; give a checkpoint file or the name of a shipped model "
                         f"({', '.join(shipped_models())})")
    check_init_fits(path, config)
    return path


def check_metadata(metadata: dict[str, str], config: ECARConfig, out: Path) -> None:
    """Refuse --metadata entries the checkpoint writer would refuse at the end of the run, now: a bad value, or
    a key one typo away from an entry the sampler reads."""
    from ..checkpoint import CheckpointError, metadata_entries

    try:
        metadata_entries(out, config, metadata)
    except CheckpointError as err:
        raise ValueError(f"--metadata: {err.problem}; fix or drop that entry") from None


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


def recorded_settings(workdir: Path) -> dict:
    """The settings record of the run in `workdir`, {} where there is none (or one check_same_run will report
    as unreadable)."""
    from ..targets import read_settings

    try:
        return read_settings(workdir / SETTINGS_FILE)
    except (OSError, ValueError):
        return {}


def recorded_vae_id(workdir: Path) -> str | None:
    """The VAE fingerprint in the settings record of the run in `workdir`, None where none is recorded (a
    pixel run, no record, or one check_same_run will report as unreadable)."""
    data = recorded_settings(workdir).get("data")
    return data.get("vae") if isinstance(data, dict) else None


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


def setup_distributed(device_arg: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the process group when torchrun started several ranks."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if world == 1:
        return torch.device("cuda" if cuda else "cpu"), 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        if local_rank >= torch.cuda.device_count():   # set_device would fail with a CUDA traceback
            raise UsageError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                             f"start at most that many ranks per machine (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu"), dist.get_rank(), world


def check_ranks_agree(trainer: Trainer, workdir: Path) -> None:
    """Every rank must start from the same step and read the same data: ranks that see different work folders
    (one per machine where a shared one was meant) would resume different states, and DDP, which syncs the
    weights only when it is built (before the state is loaded), would average gradients of different weights
    silently; ranks that read different copies of the data (a folder per machine, one of them changed) would
    average gradients of different images as silently. The data are compared by ImageSet.identity: class
    names, image count, labels and IDENTITY_ROWS evenly spaced images, not every pixel."""
    import torch
    import torch.distributed as dist

    from .data import IDENTITY_ROWS, digest

    data = int(digest(trainer.data.identity())[:15], 16)   # 60 bits: an int64 tensor holds it
    mine = torch.tensor([trainer.step, data], dtype=torch.int64, device=trainer.device)   # NCCL: on the rank's GPU
    gathered = [torch.zeros_like(mine) for _ in range(trainer.world)]
    dist.all_gather(gathered, mine)
    steps = [int(g[0]) for g in gathered]
    if len(set(steps)) > 1:
        raise UsageError(f"the ranks found different runs in --workdir {workdir} (steps {steps}, by rank): every "
                         f"rank must see the same work folder (on several machines, a shared file system)")
    first_seen = {}
    groups = [first_seen.setdefault(int(g[1]), len(first_seen)) for g in gathered]
    if len(first_seen) > 1:
        raise UsageError(f"the ranks read different data (data sets {groups}, by rank, told apart by their class "
                         f"names, image count, labels and {IDENTITY_ROWS} sampled images): every rank must read the "
                         f"same --data (on several machines, identical copies or a shared file system)")


def teardown_distributed(trainer: Trainer) -> None:
    """Leave the process group cleanly: every rank waits for the others (rank 0 may still be
    writing), then DDP's reducer is released before the group is destroyed, so no gloo work object
    outlives the group into interpreter shutdown (a known source of SIGABRT at exit)."""
    import torch.distributed as dist

    dist.barrier()
    trainer.forward = trainer.objective
    dist.destroy_process_group()


def prepare(args: argparse.Namespace, settings: TrainSettings, device: torch.device, rank: int,
            world: int, log) -> tuple[Trainer, object, dict[str, str]]:
    """(the trainer at its start or resumed step, the decoder for sample grids, the final metadata), or a
    user error: every check that can fail comes before the first step."""
    import torch
    from safetensors import SafetensorError

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
        check_same_run(workdir, run_settings(args, config, settings),
                       unknown=("data", "config.vae_scaling_factor", *init_unknown))
    data, config, decoder = open_training_data(args, config, device, Path(args.cache_dir or workdir / "cache"), log,
                                               recorded_vae_id(workdir) if step is not None else None,
                                               functools.partial(say, rank=rank))
    trainer = Trainer(config, settings, data, device, rank, world, args.accum, args.grad_checkpoint, args.compile)
    record = run_settings(args, config, settings, data)
    if step is not None:
        recorded_steps = check_same_run(workdir, record, unknown=init_unknown)
        if init_unknown:
            record["init_sha256"] = recorded_settings(workdir).get("init_sha256")
        try:
            trainer.load_state(workdir / STATE_FILE)
        except KeyError as err:   # a damaged state: a tensor or metadata entry missing
            raise unreadable_state(workdir / STATE_FILE, f"it lacks {err}") from None
        except (torch.OutOfMemoryError, torch.AcceleratorError):   # RuntimeErrors of the device, not of the file:
            raise                                                     # the state is sound, never say to delete it
        except (ConfigError, RuntimeError, SafetensorError, TypeError) as err:   # a tensor of another shape, a config
            if CPU_OUT_OF_MEMORY in str(err):   # the CPU's out-of-memory is a plain RuntimeError: the state is sound
                raise UsageError(f"not enough memory to load the resume state {workdir / STATE_FILE} "
                                 f"({' '.join(str(err).split())[:200]}); it is kept: resume where more memory is "
                                 f"free") from None
            raise unreadable_state(workdir / STATE_FILE, err) from None
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


@contextlib.contextmanager
def removed_if_left_empty(folder: Path):
    """If the block fails (a user error, Ctrl-C), remove `folder` where the block created it and left it
    empty (empty sub-folders, and the lock files of caches no longer there, aside), and the parents created
    for it: a refused run leaves no debris, and a folder that existed before, or holds a file, stays."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]   # the innermost first
    try:
        yield
    except BaseException:
        if created:
            for lock in folder.rglob("*.lock"):   # a cache build discarded on bad data leaves its lock alone
                if not [p for p in lock.parent.glob(glob.escape(lock.stem) + ".*") if p != lock]:
                    lock.unlink(missing_ok=True)
            for path in [*sorted(folder.rglob("*"), reverse=True), *created]:   # sub-folders before their parents
                with contextlib.suppress(OSError):
                    path.rmdir()   # refused for a file or a folder that is not empty
        raise


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
                    print(f"ecar-train: error: {diverged(err, workdir, settings.lr)}", file=sys.stderr, flush=True)
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
            last = trainer.step == stop
            checkpoint = trainer.step % args.ckpt_every == 0 or last
            if checkpoint:
                trainer.export_ema(workdir / EMA_FILE, metadata)   # samples as the grids and the final file do
                train_log.plot(workdir / PLOT_FILE)
            if sample_every and (trainer.step % sample_every == 0 or last):
                sample_grid(trainer, decoder, workdir / SAMPLES_DIR / f"step{trainer.step:07d}.png", metadata)
            if last:
                trainer.export_ema(out, metadata)
            if checkpoint:   # last: the state marks the step done, so a stop before it redoes the step (exactly)
                trainer.save_state(workdir / STATE_FILE)   # on resume, and every file of the step is written again
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
        args = parse_args(argv)
        train(args)
    except KeyboardInterrupt:
        if launched_rank() == 0:
            line = interrupted(Path(args.workdir)) if args else "interrupted: nothing was written"
            print(f"ecar-train: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    main()
