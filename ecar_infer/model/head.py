"""The stage head: a small AdaLN network that predicts a token state's velocity v (docs/MODEL.md, "Flow
head" and "Head variants").

* head_kind "mlp": a per-token MLP (MAR-style); the tokens of a stage are independent given the trunk.
* head_kind "attention": each block also attends over the tokens of the same stage of the same image
  (bidirectional, nothing across stages or images), with the stage's 2-D sin-cos positions added to the
  input projection, so neighbouring tokens are denoised jointly.
* head_objective "shortcut": the condition also carries the step size as a level l = log2(1/d) (FAR,
  after shortcut models); the level MLP's output layer starts at zero, so a freshly initialised
  shortcut head is the flow head at every level.

The condition of token i is c_i = cond_proj(h_i) + TimeMLP(sin-cos(time_scale * t)) (+ LevelMLP(sin-cos(l))).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ECARConfig
from ..kernels import ops
from ..stages import StagePlan, sincos_1d, stage_position_embedding
from .adaln import adaln_stack, config_table, modulation_rows

TIME_FREQ_DIM = 256


class HeadAttention(nn.Module):
    """Self-attention over the tokens of one stage of one image: [B, n, W] -> [B, n, W]."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, w // self.num_heads).unbind(dim=2)
        # the stage's own tokens are the whole "cache": every query sees all n keys, no mask
        return self.proj(ops.stage_attention(q, k, v, n).reshape(b, n, w))


class FlowHead(nn.Module):
    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = StagePlan(config)
        w, k = config.head_width, config.head_blocks
        self.attention_kind = config.head_kind == "attention"
        self.in_proj = nn.Linear(config.token_dim, w)
        self.cond_proj = nn.Linear(config.width, w)
        self.time_fc1 = nn.Linear(TIME_FREQ_DIM, w)
        self.time_fc2 = nn.Linear(w, w)
        if config.shortcut:
            self.level_fc1 = nn.Linear(TIME_FREQ_DIM, w)
            self.level_fc2 = nn.Linear(w, w)   # zero at initialisation (ECARModel.init_weights)
        # one GEMM for every sub-block's (shift, scale, gate) and the final (shift, scale): model/adaln.py
        self.subblocks = 2 * k if self.attention_kind else k
        self.modulation = nn.Linear(w, modulation_rows(self.subblocks) * w)
        if self.attention_kind:
            self.attn = nn.ModuleList(HeadAttention(w, config.head_num_heads) for _ in range(k))
            self.register_buffer("pos", config_table(self.position_table, (self.plan.total_tokens, w)),
                                 persistent=False)
        self.fc1 = nn.ModuleList(nn.Linear(w, w) for _ in range(k))
        self.fc2 = nn.ModuleList(nn.Linear(w, w) for _ in range(k))
        self.out = nn.Linear(w, config.token_dim)

    def position_table(self) -> torch.Tensor:
        """[L, W] float32 2-D sin-cos positions of every token at the head's width (attention heads only;
        load_checkpoint recomputes this buffer after building on the meta device)."""
        grid, w = self.config.grid_size, self.config.head_width
        return torch.cat([stage_position_embedding(g, grid, w) for g in self.plan.grids])

    # ---- the condition -------------------------------------------------------------------------
    def time_embedding(self, sigma: torch.Tensor) -> torch.Tensor:
        """[T] global sigmas -> [T, W]: TimeMLP(sin-cos(time_scale * sigma))."""
        freqs = sincos_1d(sigma * self.config.time_scale, TIME_FREQ_DIM).to(self.time_fc1.weight.dtype)
        return self.time_fc2(F.silu(self.time_fc1(freqs)))

    def level_embedding(self, level: torch.Tensor) -> torch.Tensor:
        """[T] shortcut levels l (step 2^-l of the local ratio) -> [T, W]: LevelMLP(sin-cos(l))."""
        freqs = sincos_1d(level, TIME_FREQ_DIM).to(self.level_fc1.weight.dtype)
        return self.level_fc2(F.silu(self.level_fc1(freqs)))

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] AR outputs -> [..., W]: the part of the head's condition that is fixed for a whole stage."""
        return self.cond_proj(h)

    # ---- the network ---------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, c: torch.Tensor, stage: int) -> torch.Tensor:
        """x: [B, n, d] the current states of stage `stage`'s n tokens; c: [B, n, W] their full conditions
        (or broadcastable to that) -> v [B, n, d]. An mlp head takes any leading dims ([R, d] rows too)."""
        if not self.attention_kind:
            # tokens are independent: one batch of rows (the form every mlp checkpoint was made with)
            lead, width = x.shape[:-1], c.shape[-1]
            rows = self._mlp_velocity(x.reshape(-1, x.shape[-1]), c.expand(*lead, width).reshape(-1, width))
            return rows.view(*lead, -1)
        return self._attention_velocity(x, c, stage)

    def _mods(self, c: torch.Tensor) -> torch.Tensor:
        return self.modulation(F.silu(c)).unflatten(-1, (modulation_rows(self.subblocks), self.config.head_width))

    def _mlp(self, i: int):
        return lambda h: self.fc2[i](F.silu(self.fc1[i](h)))

    def _mlp_velocity(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self._mods(c)                                   # [R, rows, W]
        subblocks = [self._mlp(i) for i in range(self.config.head_blocks)]
        h = adaln_stack(self.in_proj(x), lambda j: mods[:, j], subblocks, self.config.norm_eps)
        return self.out(h)

    def _attention_velocity(self, x: torch.Tensor, c: torch.Tensor, stage: int) -> torch.Tensor:
        b, n, _ = x.shape
        mods = self._mods(c.expand(b, n, -1))                  # [B, n, rows, W]: per-token modulation
        z = self.in_proj(x) + self.pos[self.plan.stage_slice(stage)].to(x.dtype)
        subblocks = [f for i in range(self.config.head_blocks) for f in (self.attn[i], self._mlp(i))]
        h = adaln_stack(z, lambda j: mods[:, :, j], subblocks, self.config.norm_eps)
        return self.out(h)

    # ---- training form -------------------------------------------------------------------------
    def full_condition(self, h: torch.Tensor, sigma: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        """Per-token conditions: h [..., D], sigma [...] global sigmas, level [...] (shortcut heads) -> [..., W]."""
        c = self.condition(h) + self.time_embedding(sigma.flatten()).view(*sigma.shape, -1)
        if self.config.shortcut:
            c = c + self.level_embedding(level.flatten()).view(*level.shape, -1)
        return c

    def forward_stage(self, x: torch.Tensor, sigma: torch.Tensor, h: torch.Tensor, stage: int,
                      level: torch.Tensor | None = None) -> torch.Tensor:
        """One stage: x [B, n, d], sigma [B] (one per image: a stage is noised consistently), h [B, n, D],
        level [B] (shortcut heads) -> v [B, n, d]."""
        b, n, _ = x.shape
        expand = lambda t: None if t is None else t[:, None].expand(b, n)  # noqa: E731
        return self.velocity(x, self.full_condition(h, expand(sigma), expand(level)), stage)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, h: torch.Tensor,
                level: torch.Tensor | None = None) -> torch.Tensor:
        """Whole sequence: x [B, L, d], sigma [B, L], h [B, L, D], level [B, L] (shortcut heads) -> v [B, L, d].

        The mlp head takes all tokens as one batch of rows (any leading dims, [R, d] rows too); the
        attention head runs stage by stage, which is attention under the block-diagonal "same stage" mask."""
        c = self.full_condition(h, sigma, level)
        if not self.attention_kind:
            return self.velocity(x, c, stage=-1)
        return torch.cat([self.velocity(x[:, sl], c[:, sl], s)
                          for s, sl in enumerate(map(self.plan.stage_slice, range(self.plan.num_stages)))], dim=1)
