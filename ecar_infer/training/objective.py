"""The training objective of docs/MODEL.md ("Training objective"): the data pyramid, per-stage endpoints
paired with one noise draw, and the flow-matching loss over all stages in one block-causal pass; plus the
random draws of one training step, made for the whole global batch from one generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.reference import upsample2x
from ..model import ECARModel
from ..schedule import stage_windows
from ..stages import StagePlan, patchify

LABEL_DROP_PROB = 0.1


# ---- the objective (docs/MODEL.md, "Training objective") ------------------------------------
def data_pyramid(x0: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """[x0^(1), ..., x0^(S)] coarse to fine: x0^(S) = x0, x0^(s) = avgpool2(x0^(s+1))."""
    levels = [x0]
    for _ in range(num_stages - 1):
        levels.insert(0, F.avg_pool2d(levels[0], 2))
    return levels


@dataclass
class StageTargets:
    x_r: torch.Tensor      # [B, C, side, side] the state at local ratio r
    x_end: torch.Tensor    # [B, C, side, side] the stage's end point
    target: torch.Tensor   # [B, C, side, side] x_start - x_end
    sigma: torch.Tensor    # [B] the global sigma of r, the head's time input


def stage_targets(x0: torch.Tensor, eps: list[torch.Tensor], r: torch.Tensor) -> list[StageTargets]:
    """Per stage s: x_end = (1-e_s) x0^(s) + e_s eps_s; x_start = (1-start_s) Up(x0^(s-1)) + start_s eps_s
    (x_start = eps_1 at the first stage); x_r = r x_start + (1-r) x_end; target x_start - x_end.

    eps[s]: [B, C, side_s, side_s] standard normal, used for both ends; r: [B, S] in [0, 1).
    """
    pyramid = data_pyramid(x0, len(eps))
    out = []
    for s, ((start, end), x0_s, eps_s) in enumerate(zip(stage_windows(len(eps)), pyramid, eps)):
        x_end = (1 - end) * x0_s + end * eps_s
        x_start = eps_s if s == 0 else (1 - start) * upsample2x(pyramid[s - 1]) + start * eps_s
        r_s = r[:, s].view(-1, 1, 1, 1).to(x0.dtype)
        out.append(StageTargets(r_s * x_start + (1 - r_s) * x_end, x_end, x_start - x_end,
                                end + r[:, s] * (start - end)))
    return out


def build_objective(model: ECARModel, ema: ECARModel) -> nn.Module:
    """The training objective of the model's config: forward(x0, labels, draws) -> scalar loss. A module
    so that DDP can wrap it; `ema` is the EMA model (targets of objectives that bootstrap from it)."""
    return FlowMatchingObjective(model)


class FlowMatchingObjective(nn.Module):
    """forward(x0, labels, eps, r) -> the MSE of the head's v against x_start - x_end over every token of
    every stage, all stages in one block-causal pass of the trunk. A module so DDP can wrap it."""

    def __init__(self, model: ECARModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor, labels: torch.Tensor, draws: "StepDraws") -> torch.Tensor:
        """x0: [B, C, H, W] data; labels: [B] true classes (the objective applies draws.drop); draws: this
        rank's share of the step's random draws, on x0's device."""
        p, plan = self.model.config.patch_size, self.model.plan
        labels = torch.where(draws.drop, self.model.config.null_class, labels)
        stages = stage_targets(x0, draws.eps, draws.r)
        # the AR input of stage s > 1 is Up of stage s-1's x_end
        h = self.model.forward_full(labels, [upsample2x(st.x_end) for st in stages[:-1]])
        x_rows = torch.cat([patchify(st.x_r, p) for st in stages], dim=1)
        targets = torch.cat([patchify(st.target, p) for st in stages], dim=1)
        sigmas = torch.cat([st.sigma[:, None].expand(-1, n) for st, n in zip(stages, plan.tokens)], dim=1)
        v = self.model.head(x_rows.flatten(0, 1), sigmas.flatten().to(x0.dtype), h.flatten(0, 1))
        return F.mse_loss(v.float(), targets.flatten(0, 1).float())


@dataclass
class StepDraws:
    """All random inputs of one training step for the whole global batch."""

    index: torch.Tensor        # [G] rows of the data set
    eps: list[torch.Tensor]    # per stage [G, C, side_s, side_s]
    r: torch.Tensor            # [G, S]
    drop: torch.Tensor         # [G] bool: replace the label by the null class

    def shard(self, rank: int, world: int) -> "StepDraws":
        return StepDraws(self.index[rank::world], [e[rank::world] for e in self.eps], self.r[rank::world],
                         self.drop[rank::world])

    def to(self, device: torch.device) -> "StepDraws":
        return StepDraws(self.index.to(device), [e.to(device) for e in self.eps], self.r.to(device),
                         self.drop.to(device))


def draw_step(gen: torch.Generator, plan: StagePlan, data_size: int, batch: int) -> StepDraws:
    c = plan.config.latent_channels
    index = torch.randint(data_size, (batch,), generator=gen)
    eps = [torch.randn(batch, c, side, side, generator=gen) for side in plan.latent_sides]
    r = torch.rand(batch, plan.num_stages, generator=gen)
    drop = torch.rand(batch, generator=gen) < LABEL_DROP_PROB
    return StepDraws(index, eps, r, drop)
