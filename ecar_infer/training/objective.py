"""The training objective of docs/MODEL.md ("Training objective"): the data pyramid, per-stage endpoints
paired with one noise draw, and the flow-matching loss over all stages in one block-causal pass; plus the
random draws of one training step, made for the whole global batch from one generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..editing import known_endpoints   # the endpoint pairing, shared with editing
from ..kernels.reference import upsample2x, upsample_renoise
from ..model import ECARModel
from ..schedule import stage_jumps, stage_windows
from ..stages import StagePlan, patchify

LABEL_DROP_PROB = 0.1
STAGE_NOISE = ("independent", "tied")   # how the stages' noise draws relate (tie_stage_noise)
SHORTCUT_FRACTION = 0.25     # share of (image, stage) pairs that train on self-consistency targets
SHORTCUT_TARGET_CLIP = 4.0   # consistency targets are clipped to +-this (as shortcut models do)


# ---- the objective (docs/MODEL.md, "Training objective") ------------------------------------
@dataclass
class StageTargets:
    x_r: torch.Tensor      # [B, C, side, side] the state at local ratio r
    x_end: torch.Tensor    # [B, C, side, side] the stage's end point
    target: torch.Tensor   # [B, C, side, side] x_start - x_end
    sigma: torch.Tensor    # [B] the global sigma of r, the head's time input


def stage_targets(x0: torch.Tensor, eps: list[torch.Tensor], r: torch.Tensor) -> list[StageTargets]:
    """Per stage s: x_end = (1-e_s) x0^(s) + e_s eps_s; x_start = (1-start_s) Up(x0^(s-1)) + start_s eps_s
    (x_start = eps_1 at the first stage); x_r = r x_start + (1-r) x_end; target x_start - x_end.

    eps[s]: [B, C, side_s, side_s] standard normal, used for both ends; r: [B, S] in [0, 1] (1 only on the
    shortcut objective's self-consistency rows, whose r lies on a level's grid d, 2d, ..., 1).
    """
    out = []
    for s, ((start, end), (x_start, x_end)) in enumerate(zip(stage_windows(len(eps)), known_endpoints(x0, eps))):
        r_s = r[:, s].view(-1, 1, 1, 1).to(x0.dtype)
        out.append(StageTargets(r_s * x_start + (1 - r_s) * x_end, x_end, x_start - x_end,
                                end + r[:, s] * (start - end)))
    return out


def tie_stage_noise(xi: list[torch.Tensor]) -> list[torch.Tensor]:
    """Stage noise whose every stage start is the sampler's jump from the previous stage's end (docs/MODEL.md,
    "Training objective", the tied pairing): eps_1 = xi_1 and, for s >= 1,
    eps_(s+1) = (alpha_s e_s Up(eps_s) + beta_s n'(xi_(s+1))) / start_(s+1).
    Each is standard normal, i.i.d. at its stage's size (the re-noising identity), so every stage's marginal
    pairs are those of the independent draws; but then (1 - start) Up(x0^(s)) + start eps_(s+1) =
    alpha Up(x_end^(s)) + beta n', so the head is trained on the stage starts that sampling makes from the
    trunk's own input, noise and all. xi: per stage [B, C, side_s, side_s] standard normal."""
    windows, jumps = stage_windows(len(xi)), stage_jumps(len(xi))
    eps = [xi[0]]
    for s, (alpha, beta) in enumerate(jumps):
        end, start = windows[s][1], windows[s + 1][0]
        eps.append(upsample_renoise(end * eps[s], xi[s + 1], alpha, beta) / start)
    return eps


def build_objective(model: ECARModel, ema: ECARModel) -> nn.Module:
    """The training objective of the model's config: forward(x0, labels, draws) -> scalar loss. A module
    so that DDP can wrap it; `ema` is the EMA model (targets of objectives that bootstrap from it)."""
    return ShortcutObjective(model, ema) if model.config.shortcut else FlowMatchingObjective(model)


class FlowMatchingObjective(nn.Module):
    """forward(x0, labels, draws) -> the MSE of the head's v against x_start - x_end over every token of
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
        v = self.model.head(x_rows, sigmas.to(x0.dtype), h)
        return F.mse_loss(v.float(), targets.float())


@dataclass
class StepDraws:
    """All random inputs of one training step for the whole global batch."""

    index: torch.Tensor        # [G] rows of the data set
    eps: list[torch.Tensor]    # per stage [G, C, side_s, side_s]
    r: torch.Tensor            # [G, S]
    drop: torch.Tensor         # [G] bool: replace the label by the null class
    # shortcut heads: [G, S] the level each (image, stage) trains at; shortcut_max_level marks a flow row,
    # a lower level a self-consistency row (whose r is then on that level's grid)
    level: torch.Tensor | None = None

    def shard(self, rank: int, world: int) -> "StepDraws":
        return StepDraws(self.index[rank::world], [e[rank::world] for e in self.eps], self.r[rank::world],
                         self.drop[rank::world], None if self.level is None else self.level[rank::world])

    def to(self, device: torch.device) -> "StepDraws":
        return StepDraws(self.index.to(device), [e.to(device) for e in self.eps], self.r.to(device),
                         self.drop.to(device), None if self.level is None else self.level.to(device))


def draw_step(gen: torch.Generator, plan: StagePlan, data_size: int, batch: int,
              stage_noise: str = "independent") -> StepDraws:
    """The random inputs of one step; stage_noise "tied" draws the same numbers and ties them across stages
    (tie_stage_noise)."""
    if stage_noise not in STAGE_NOISE:
        raise ValueError(f"stage_noise must be one of {STAGE_NOISE}, got {stage_noise!r}")
    c = plan.config.latent_channels
    index = torch.randint(data_size, (batch,), generator=gen)
    eps = [torch.randn(batch, c, side, side, generator=gen) for side in plan.latent_sides]
    if stage_noise == "tied":
        eps = tie_stage_noise(eps)
    r = torch.rand(batch, plan.num_stages, generator=gen)
    drop = torch.rand(batch, generator=gen) < LABEL_DROP_PROB
    if not plan.config.shortcut:
        return StepDraws(index, eps, r, drop)
    # shortcut rows: level l ~ U{0..l_max-1}, d = 2^-l, r ~ U{d, 2d, ..., 1}
    top = plan.config.shortcut_max_level
    consistency = torch.rand(batch, plan.num_stages, generator=gen) < SHORTCUT_FRACTION
    level = torch.randint(top, (batch, plan.num_stages), generator=gen)
    k = (torch.rand(batch, plan.num_stages, generator=gen) * 2.0 ** level).floor() + 1
    r = torch.where(consistency, k * 2.0 ** -level, r)
    return StepDraws(index, eps, r, drop, torch.where(consistency, level, top))


def shortcut_target(head: nn.Module, x_r: torch.Tensor, h: torch.Tensor, stage: int, r: torch.Tensor,
                    level: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """The self-consistency target of a step of size d = 2^-level from local ratio r: the mean of two
    half steps of `head` (docs/MODEL.md, "Head variants", its shortcut objective), clipped.

    x_r: [B, n, d] states; h: [B, n, D] trunk outputs; r, level: [B]. Returns [B, n, d].
    """
    start, end = window
    half = 2.0 ** -(level.to(x_r.dtype) + 1)
    sigma = lambda ratio: end + ratio * (start - end)  # noqa: E731
    finer = level + 1
    a = head.forward_stage(x_r, sigma(r), h, stage, finer.to(x_r.dtype))
    b = head.forward_stage(x_r - half.view(-1, 1, 1) * a, sigma(r - half), h, stage, finer.to(x_r.dtype))
    return ((a + b) / 2).clamp(-SHORTCUT_TARGET_CLIP, SHORTCUT_TARGET_CLIP)


class ShortcutObjective(nn.Module):
    """Flow matching on the rows at the finest level, self-consistency on the others (docs/MODEL.md,
    "Head variants", its shortcut objective): one MSE over all rows.

    The consistency targets come from the EMA head, without gradient, on the trunk's detached output,
    and the trunk gets gradient from the flow rows only. Labels are dropped on both kinds of rows, so
    that the null class (the unguided branch of every guided step) learns the large steps too.
    """

    def __init__(self, model: ECARModel, ema: ECARModel) -> None:
        super().__init__()
        self.model = model
        self._ema = (ema,)   # not a submodule: DDP must not see (or broadcast) the EMA

    def forward(self, x0: torch.Tensor, labels: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        cfg, plan = self.model.config, self.model.plan
        p, top = cfg.patch_size, cfg.shortcut_max_level
        labels = torch.where(draws.drop, cfg.null_class, labels)
        stages = stage_targets(x0, draws.eps, draws.r)
        h = self.model.forward_full(labels, [upsample2x(st.x_end) for st in stages[:-1]])
        targets, windows = [], stage_windows(plan.num_stages)
        for s, (st, sl) in enumerate(zip(stages, map(plan.stage_slice, range(plan.num_stages)))):
            target = patchify(st.target, p)
            rows = (draws.level[:, s] < top).nonzero().squeeze(1)
            if len(rows):
                with torch.no_grad():
                    consistency = shortcut_target(self._ema[0].head, patchify(st.x_r, p)[rows], h[rows, sl].detach(),
                                                  s, draws.r[rows, s], draws.level[rows, s], windows[s])
                target = target.index_copy(0, rows, consistency.to(target.dtype))
            targets.append(target)
        level = torch.cat([draws.level[:, s, None].expand(-1, n) for s, n in enumerate(plan.tokens)], dim=1)
        h = torch.where((level < top)[..., None], h.detach(), h)
        x_rows = torch.cat([patchify(st.x_r, p) for st in stages], dim=1)
        sigmas = torch.cat([st.sigma[:, None].expand(-1, n) for st, n in zip(stages, plan.tokens)], dim=1)
        v = self.model.head(x_rows, sigmas.to(x0.dtype), h, level.to(x0.dtype))
        return F.mse_loss(v.float(), torch.cat(targets, dim=1).float())
