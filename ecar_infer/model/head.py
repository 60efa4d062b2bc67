"""The flow head: a small per-token MLP with AdaLN blocks (MAR-style) that predicts v = x_start - x_end.

Tokens are independent here, so all tokens of a stage and all images of a batch are one batch of rows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ECARConfig
from ..kernels import ops
from ..stages import sincos_1d

TIME_FREQ_DIM = 256


class FlowHead(nn.Module):
    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        self.config = config
        w, k = config.head_width, config.head_blocks
        self.in_proj = nn.Linear(config.token_dim, w)
        self.cond_proj = nn.Linear(config.width, w)
        self.time_fc1 = nn.Linear(TIME_FREQ_DIM, w)
        self.time_fc2 = nn.Linear(w, w)
        # one GEMM for every block's (shift, scale, gate) and the final (shift, scale)
        self.modulation = nn.Linear(w, (3 * k + 2) * w)
        self.fc1 = nn.ModuleList(nn.Linear(w, w) for _ in range(k))
        self.fc2 = nn.ModuleList(nn.Linear(w, w) for _ in range(k))
        self.out = nn.Linear(w, config.token_dim)

    def time_embedding(self, sigma: torch.Tensor) -> torch.Tensor:
        """[T] global sigmas -> [T, W]: TimeMLP(sin-cos(time_scale * sigma))."""
        freqs = sincos_1d(sigma * self.config.time_scale, TIME_FREQ_DIM).to(self.time_fc1.weight.dtype)
        return self.time_fc2(F.silu(self.time_fc1(freqs)))

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        """[R, D] AR outputs -> [R, W]: the part of the head's condition that is fixed for a whole stage."""
        return self.cond_proj(h)

    def velocity(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: [R, d] current token states; c: [R, W] full condition (cond_proj(h) + time embedding)."""
        w, k, eps = self.config.head_width, self.config.head_blocks, self.config.norm_eps
        mods = self.modulation(F.silu(c)).view(c.shape[0], 3 * k + 2, w)
        z = self.in_proj(x)
        h = ops.layernorm_modulate(z, mods[:, 0], mods[:, 1], eps)
        for i in range(k):
            y = self.fc2[i](F.silu(self.fc1[i](h)))
            # the residual fuses with the next LayerNorm: block i+1's, or the final one
            z, h = ops.gated_residual_layernorm_modulate(z, mods[:, 3 * i + 2], y, mods[:, 3 * i + 3],
                                                         mods[:, 3 * i + 4], eps)
        return self.out(h)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Training form: x [R, d], per-row global sigma [R], AR output h [R, D] -> v [R, d]."""
        return self.velocity(x, self.condition(h) + self.time_embedding(sigma))
