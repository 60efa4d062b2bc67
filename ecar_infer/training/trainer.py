"""Reference trainer: the training objective of docs/MODEL.md, AdamW, an EMA of the weights (what
ships), periodic and resumable checkpoints, and data parallel training with torchrun.

    ecar-train --preset ecar-digits32 --threads 1 --workdir runs/digits32 --out my-digits32.safetensors
    torchrun --nproc_per_node 8 -m ecar_infer.training ...     # DistributedDataParallel, one GPU per rank

Every random draw of a step (batch indices, per-stage noise, r, label drops) comes from one CPU
generator for the whole global batch, and rank k trains on rows k, k+W, k+2W, ... of it. A run is
therefore the same for any world size (up to float reduction order), and resuming needs one RNG state.

The resume state (<workdir>/state.safetensors) holds the model, the EMA, the AdamW moments and the
generator state as tensors, and the step in its metadata: safetensors only, no pickle.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ECARConfig
from ..model import ECARModel
from .objective import build_objective, draw_step

STATE_FILE = "state.safetensors"
EMA_FILE = "ema.safetensors"


# ---- the trainer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    # defaults: the recipe of the shipped weights/ecar-digits32.safetensors
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
    """One rank's training state: model, EMA, AdamW, the shared step generator, the step counter."""

    def __init__(self, config: ECARConfig, settings: TrainSettings, data: torch.Tensor, labels: torch.Tensor,
                 device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.config, self.settings = config, settings
        self.device, self.rank, self.world = device, rank, world
        self.data, self.labels = data.to(device), labels.to(device)
        self.model = ECARModel(config).init_weights(settings.seed, zero_init=True).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.objective = build_objective(self.model, self.ema)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(self.objective,
                                                     device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, betas=(0.9, 0.99),
                                           weight_decay=settings.weight_decay)
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.loss_avg = float("nan")   # running mean of the loss (the last ~100 steps)

    def train_step(self) -> float:
        s = self.settings
        draws = draw_step(self.gen, self.model.plan, len(self.data), s.batch_size)
        draws = draws.shard(self.rank, self.world).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(self.step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.objective(self.data[draws.index], self.labels[draws.index], draws)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            decay = s.ema_decay_at(self.step)
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        value = loss.detach()
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        value = value.item()
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
        tmp = path.with_suffix(".tmp")
        save_file(self.state_tensors(), str(tmp), metadata=meta)
        os.replace(tmp, path)   # never leave a half-written state behind

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

    def training_metadata(self) -> dict[str, str]:
        return {"training_data": f"digits32 train split, {len(self.data)} images (ecar_infer.data)",
                "training_steps": str(self.step), "training_batch_size": str(self.settings.batch_size),
                "training_final_loss": f"{self.loss_avg:.5f}", "training_settings": json.dumps(
                    self.settings.__dict__, sort_keys=True)}

    def export_ema(self, path: Path, extra: dict[str, str] | None = None) -> None:
        from ..checkpoint import save_checkpoint

        save_checkpoint(self.ema, str(path), extra_metadata={**self.training_metadata(), **(extra or {})})


# ---- command line ----------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="ecar-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="ecar-digits32", help="model config preset (ecar_infer.registry)")
    p.add_argument("--config", help="a config JSON file instead of --preset")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch over all ranks")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-size", type=int, default=None, help="images in the digits32 train split")
    p.add_argument("--workdir", default="runs/digits32", help="resume state and periodic EMA checkpoints")
    p.add_argument("--out", help="final EMA checkpoint (default <workdir>/final.safetensors)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between resume states / EMA checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from <workdir>/state.safetensors if present")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="extra metadata for the final checkpoint, e.g. recommended_cfg=2.0 (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (torchrun: the local rank's GPU)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 is fastest on a busy CPU")
    args = p.parse_args(argv)
    if any("=" not in kv for kv in args.metadata):
        p.error("--metadata takes KEY=VALUE")
    return args


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
    trainer.objective = trainer.objective.module
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    from .digits import NUM_CLASSES, build_split

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = (ECARConfig.from_json(Path(args.config).read_text()) if args.config
              else ECARConfig.preset(args.preset))
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             weight_decay=args.weight_decay, ema_decay=args.ema_decay, seed=args.seed)
    device, rank, world = setup_distributed(args.device)
    if settings.batch_size % world:
        raise SystemExit(f"--batch-size {settings.batch_size} must be divisible by the world size {world}")
    if config.latent_kind != "pixel" or config.latent_channels != 1 or config.num_classes != NUM_CLASSES:
        raise SystemExit("ecar-train trains on digits32: it needs a pixel config with 1 channel and 10 classes")
    images, labels = build_split("train", args.train_size, config.image_size)
    trainer = Trainer(config, settings, torch.from_numpy(images), torch.from_numpy(labels), device, rank, world)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / STATE_FILE
    if args.resume and state_path.exists():
        trainer.load_state(state_path)
    if rank == 0:
        print(f"ecar-train: {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
              f"step {trainer.step}/{settings.steps}, world {world}, device {device}", flush=True)
    bar = tqdm(total=settings.steps, initial=trainer.step, disable=rank != 0, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    while trainer.step < settings.steps:
        loss = trainer.train_step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{trainer.loss_avg:.4f}", refresh=False)
        if rank == 0 and (trainer.step % args.ckpt_every == 0 or trainer.step == settings.steps):
            trainer.save_state(state_path)
            trainer.export_ema(workdir / EMA_FILE)
    bar.close()
    if rank == 0:
        out = Path(args.out) if args.out else workdir / "final.safetensors"
        trainer.export_ema(out, dict(kv.split("=", 1) for kv in args.metadata))
        print(f"ecar-train: wrote {out} (step {trainer.step}, loss {trainer.loss_avg:.5f})", flush=True)
    if world > 1:
        teardown_distributed(trainer)


if __name__ == "__main__":
    main()
