"""Token geometry of the stage pyramid: grids, token counts, prefixes, (un)patchify, positions.

Stage s (1-based in docs/MODEL.md, 0-based here) has a g_s x g_s token grid, g_s = g / 2^(S-1-s), and
n_s = g_s^2 tokens of dim d = C*p^2; its tokens sit at rows [P_s, P_s + n_s) of the whole sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import ECARConfig


@dataclass(frozen=True)
class StagePlan:
    config: ECARConfig

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @cached_property
    def grids(self) -> tuple[int, ...]:
        g, s = self.config.grid_size, self.config.num_stages
        return tuple(g // 2 ** (s - 1 - i) for i in range(s))

    @cached_property
    def latent_sides(self) -> tuple[int, ...]:
        return tuple(g * self.config.patch_size for g in self.grids)

    @cached_property
    def tokens(self) -> tuple[int, ...]:
        return tuple(g * g for g in self.grids)

    @cached_property
    def prefixes(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.tokens:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return self.prefixes[-1] + self.tokens[-1]

    def stage_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[L] int32: the stage of every token of the whole sequence."""
        return torch.repeat_interleave(torch.arange(self.num_stages, dtype=torch.int32),
                                       torch.tensor(self.tokens)).to(device)

    def stage_slice(self, s: int) -> slice:
        return slice(self.prefixes[s], self.prefixes[s] + self.tokens[s])


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], tokens in row-major grid order."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """[B, g*g, C*p*p] -> [B, C, g*p, g*p] (inverse of patchify)."""
    b, n, _ = tokens.shape
    g = math.isqrt(n)
    x = tokens.reshape(b, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, g * p, g * p)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] float positions -> [N, dim] sin-cos features with frequencies 1/10000^(k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def stage_position_embedding(grid: int, full_grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sin-cos embedding of each token's centre, measured in units of the finest
    token grid (a centre u in the unit square at u * full_grid), so all stages share one spatial frame and a
    stage-s token lands between the finer tokens it covers (docs/MODEL.md, "AR transformer").
    """
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * full_grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    emb = torch.cat([sincos_1d(ys.reshape(-1), dim // 2), sincos_1d(xs.reshape(-1), dim // 2)], dim=1)
    return emb.to(torch.float32)
