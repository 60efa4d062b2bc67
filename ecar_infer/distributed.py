"""Sampling on several processes started by torchrun: which rank samples which batches, and how the ranks
keep in step without ever waiting forever.

A request's batches are fixed by the batch size alone (batch b holds images b*B ... b*B+B-1, image k
with seed SEED+k), so a batch is the same computation on any rank, in any run, with any number of
ranks; that is what makes a sharded or resumed run byte-identical to one process. Rank 0 lists the
batches the output still lacks and every rank samples its share of them in rounds: in round i, rank r
samples missing batch i*world + r. After each round the ranks add up the images done (rank 0's progress
bar counts every rank's work).

The ranks talk over gloo on the CPU even when they sample on GPUs: they exchange a few numbers per round,
and a gloo collective fails as soon as a peer's connection drops, or after the timeout when a peer hangs,
so a rank that died makes the others stop with an error instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence


def launched_world_size() -> int:
    """The number of ranks torchrun started (1 when run as a plain command)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank as torchrun set it (0 when run as a plain command)."""
    return int(os.environ.get("RANK", "0"))


class RankLost(RuntimeError):
    """Another rank stopped, or stopped answering, while this one waited for it."""


def _detail(err: Exception, limit: int = 120) -> str:
    """The first line of a torch/gloo error, without its "[file.cc:123] " source prefix, at most `limit`
    characters: what to show in RankLost's one line."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", lines[0])
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class Group:
    """This process's place among the ranks; with world == 1 every collective is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 0.0

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._wait(dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        self._wait(dist.all_gather_object, out, obj)
        return out

    def _wait(self, collective, *args, **kwargs) -> None:
        try:
            collective(*args, **kwargs)
        except RuntimeError as err:  # gloo: a peer's connection closed, or the timeout passed
            if "timed out" in str(err).lower() or "timeout" in str(err).lower():
                raise RankLost(f"another rank did not answer within {self.timeout_s:g} s ({_detail(err)})") from None
            raise RankLost(f"another rank stopped: its connection closed ({_detail(err)})") from None


def join(timeout_s: float) -> Group:
    """Join the ranks torchrun started (gloo, with `timeout_s` as every wait's bound); one process alone
    gets a group of one."""
    if launched_world_size() == 1:
        return Group()
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:  # a rank never came (torch's store and gloo errors are RuntimeErrors)
        raise RankLost(f"could not meet the other ranks within {timeout_s:g} s ({_detail(err)})") from None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), timeout_s)


def leave(group: Group | None) -> None:
    if group is not None and group.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Tally:
    """Images sampled and seconds spent sampling, per rank."""

    images: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def sample_in_rounds(group: Group, todo: Sequence[int], sample: Callable[[int], tuple[int, float]],
                     on_round: Callable[[int], None] = lambda images: None) -> Tally:
    """Run sample(batch) -> (images, seconds) for this rank's share of the batches `todo` (the same list
    on every rank), round by round; on_round(images done by all ranks in the round) after each round.
    Returns every rank's totals; when it returns, every rank has finished (and written) its batches."""
    images, seconds = 0, 0.0
    for first in range(0, len(todo), group.world):
        mine = first + group.rank
        done = 0
        if mine < len(todo):
            done, spent = sample(todo[mine])
            images, seconds = images + done, seconds + spent
        on_round(sum(group.gather(done)))
    totals = group.gather((images, seconds))
    return Tally([n for n, _ in totals], [s for _, s in totals])
