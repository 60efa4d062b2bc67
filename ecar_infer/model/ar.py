"""The AR transformer: DiT-style AdaLN-Zero blocks over the stage pyramid, with two forwards.

* forward_full: the whole sequence under the block-causal mask (training, and the parity oracle);
* forward_stage: one stage over the static KV cache (inference).
Both run the same block loop; only the attention call differs. Ops go through ecar_infer.kernels.ops.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import StaticKVCache
from ..config import ECARConfig
from ..kernels import ops
from ..stages import StagePlan, patchify, stage_position_embedding
from .adaln import adaln_stack, config_table, modulation_rows

# attend(layer, q, k, v) -> attention output [B, n, H, Dh]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SUBBLOCKS_PER_BLOCK = 2  # attention, then the MLP (model/adaln.py gives the modulation rows)


def trunk_modulation_rows(depth: int) -> int:
    return modulation_rows(SUBBLOCKS_PER_BLOCK * depth)


class ARBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        # this block's rows of the layout in model/adaln.py: (shift, scale, gate) of attention, then of the MLP
        self.adaLN = nn.Linear(width, 3 * SUBBLOCKS_PER_BLOCK * width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def qkv_heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(dim=2)
        return q, k, v

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class ARTransformer(nn.Module):
    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = StagePlan(config)
        d = config.width
        self.class_emb = nn.Embedding(config.num_classes + 1, d)  # last row: the null class
        self.stage_emb = nn.Embedding(config.num_stages, d)
        self.input_proj = nn.Linear(config.token_dim, d)          # W_in for stages after the first
        self.blocks = nn.ModuleList(ARBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.register_buffer("pos", config_table(self.position_table, (self.plan.total_tokens, d)), persistent=False)

    def position_table(self) -> torch.Tensor:
        """[L, D] float32 positions of every token of the whole sequence (the `pos` buffer; load_checkpoint
        recomputes it after building the model on the meta device)."""
        grid, width = self.config.grid_size, self.config.width
        return torch.cat([stage_position_embedding(g, grid, width) for g in self.plan.grids])

    # ---- conditioning --------------------------------------------------------------------
    def condition(self, class_labels: torch.Tensor) -> torch.Tensor:
        """All AdaLN modulations of a request, computed once: [trunk_modulation_rows(depth), B, D], each row
        [B, D] contiguous, in the layout of model/adaln.py (sub-blocks: block i's attention is 2i, its MLP
        2i + 1)."""
        c = F.silu(self.class_emb(class_labels))
        b, d = c.shape
        mods = [blk.adaLN(c).view(b, 3 * SUBBLOCKS_PER_BLOCK, d) for blk in self.blocks]
        mods.append(self.final_adaLN(c).view(b, 2, d))
        return torch.cat(mods, dim=1).transpose(0, 1).contiguous()

    # ---- inputs ----------------------------------------------------------------------------
    def stage_inputs(self, s: int, class_labels: torch.Tensor, prev_up: torch.Tensor | None) -> torch.Tensor:
        """Input tokens of stage s: [B, n_s, D].

        Stage 0: the class embedding; later stages: W_in of the patchified, upsampled end state of the
        previous stage (prev_up: [B, C, side_s, side_s]). Each adds its positions and stage embedding.
        """
        rows = self.plan.stage_slice(s)
        extra = self.pos[rows] + self.stage_emb.weight[s]
        if s == 0:
            return self.class_emb(class_labels)[:, None, :] + extra
        return self.input_proj(patchify(prev_up, self.config.patch_size)) + extra

    # ---- the block loop -------------------------------------------------------------------
    def _run(self, x: torch.Tensor, mods: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        def attention(i: int, blk: ARBlock) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda h: blk.proj(attend(i, *blk.qkv_heads(h)).reshape(h.shape))

        subblocks = [f for i, blk in enumerate(self.blocks) for f in (attention(i, blk), blk.mlp)]
        return adaln_stack(x, mods.__getitem__, subblocks, self.config.norm_eps)

    def forward_full(self, tokens: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        """The first stages' tokens under the block-causal mask: tokens [B, P, D] -> h [B, P, D], where P is
        the token count of a whole number of stages (all L tokens for training)."""
        stage_ids = self.plan.stage_ids(tokens.device)[: tokens.shape[1]]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return ops.block_causal_attention(q, k, v, stage_ids)

        return self._run(tokens, mods, attend)

    def forward_stage(self, s: int, tokens: torch.Tensor, mods: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Stage s over the static KV cache: tokens [B, n_s, D] -> h [B, n_s, D]; writes the stage's K/V."""
        start = self.plan.prefixes[s]
        kv_len = start + self.plan.tokens[s]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write(layer, start, k, v)
            return ops.stage_attention(q, cache.keys(layer), cache.values(layer), kv_len)

        return self._run(tokens, mods, attend)
