"""The ranks of an ecar-train run under torchrun: joining the process group, checking that every rank
resumes the same run on the same data, leaving the group; and the line a rank says."""
from __future__ import annotations

import os
from pathlib import Path

from ..command import UsageError
from .trainer import Trainer

# torch takes seconds to import: each function imports what it uses (ecar_infer/training/train_cli.py says why)


def say(message: str, rank: int = 0) -> None:
    """One line of news on stdout, naming the rank where it is not rank 0."""
    print(f"ecar-train: {message}" if rank == 0 else f"ecar-train: rank {rank}: {message}", flush=True)


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
