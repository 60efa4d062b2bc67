"""The training state of ecar-train (ecar_infer/training/train_cli.py): the model, the EMA of its weights (what
ships), AdamW, the step generator and the step counter; one training step of the objective of docs/MODEL.md
("Training objective"), and the resume state. Also what depends on the training state alone: whether an
--init checkpoint fits the config, whether the batch splits over the ranks, and the EMA's sample grids.

Every random draw of a step (batch indices, per-stage noise, r, label drops, then the data's flips and
latent noise) comes from one CPU generator for the whole global batch, and rank k trains on rows
k, k+W, k+2W, ... of it (and reads only those rows of the data). A run is therefore the same for any
world size (up to float reduction order), and resuming needs one RNG state. Gradient accumulation
splits a rank's rows into equal micro-batches whose mean loss is the loss of the whole batch.

The resume state (<workdir>/state.safetensors) holds the model, the EMA, the AdamW moments and the
generator state as tensors, and the step in its metadata: safetensors only, no pickle.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path
from ..class_names import METADATA_KEY as CLASS_NAMES_KEY
from ..class_names import encode_class_names, label_rows
from ..checks import some_of
from ..config import ECARConfig

# torch takes seconds to import: each function imports what it uses (ecar_infer/training/train_cli.py says why)


LOSS_WINDOW = 100   # the steps whose losses loss_avg averages


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
            raise Diverged(self.step + 1, value, norm, None if row is None else self.data.not_finite(row))
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


class Diverged(Exception):
    """A step whose loss or gradient norm is not finite: the weights it updated are lost, and so would be
    every file written from them."""

    def __init__(self, step: int, loss: float, grad_norm: float, bad_data: tuple[str, str] | None = None):
        super().__init__(f"step {step}: loss {loss}, gradient norm {grad_norm}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        self.bad_data = bad_data   # (where, what to do) where the step's data itself was not finite


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


def check_batch_split(batch_size: int, world: int, accum: int) -> None:
    """Each rank's micro-batches must split the global batch evenly."""
    if batch_size % (world * accum):
        raise ValueError(f"the batch size {batch_size} must be divisible by the world size {world} times the "
                         f"gradient accumulation {accum}")


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
