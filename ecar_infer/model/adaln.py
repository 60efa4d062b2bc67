"""The AdaLN-Zero modulation layout shared by the trunk and the head (docs/MODEL.md).

Both are a stack of J residual sub-blocks (the trunk: attention and MLP of every block, J = 2 * depth;
the mlp head: one MLP per block, J = head_blocks; the attention head: attention and MLP, J = 2 *
head_blocks). Each sub-block j is  x <- x + gate_j * f_j(LN(x) * (1 + scale_j) + shift_j),  and the
stack ends with a final LN(x) * (1 + scale_J) + shift_J. Its modulation tensor therefore has 3J + 2
rows, in this order:

    row 3j     shift of sub-block j's pre-norm       (j = 0..J-1)
    row 3j + 1 scale of sub-block j's pre-norm
    row 3j + 2 gate of sub-block j's residual
    row 3J     shift of the final norm
    row 3J + 1 scale of the final norm

so the rows of sub-block j are (shift, scale, gate), and "the next norm" of sub-block j is always at
rows 3(j+1) and 3(j+1) + 1, whether it is sub-block j+1's or the final one. That is what lets each
residual add fuse with the following LayerNorm + modulation in one op.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..kernels import ops

ROWS_PER_SUBBLOCK = 3  # shift, scale, gate


def modulation_rows(subblocks: int) -> int:
    """Rows of the modulation tensor of a stack of `subblocks` sub-blocks: 3J + 2."""
    return ROWS_PER_SUBBLOCK * subblocks + 2


def shift_row(j: int) -> int:
    """Shift of sub-block j's pre-norm; j = J is the final norm's."""
    return ROWS_PER_SUBBLOCK * j


def scale_row(j: int) -> int:
    return ROWS_PER_SUBBLOCK * j + 1


def gate_row(j: int) -> int:
    return ROWS_PER_SUBBLOCK * j + 2


def adaln_stack(x: torch.Tensor, mod: Callable[[int], torch.Tensor],
                subblocks: Sequence[Callable[[torch.Tensor], torch.Tensor]], eps: float) -> torch.Tensor:
    """Run a stack of AdaLN-Zero sub-blocks and return the final modulated norm of the residual stream.

    x: the residual stream; mod(row) -> that modulation row, per sample or per token (see
    kernels/reference.py); subblocks[j](h) -> f_j(h), the sub-block's output before its gate.
    """
    h = ops.layernorm_modulate(x, mod(shift_row(0)), mod(scale_row(0)), eps)
    for j, f in enumerate(subblocks):
        x, h = ops.gated_residual_layernorm_modulate(x, mod(gate_row(j)), f(h), mod(shift_row(j + 1)),
                                                     mod(scale_row(j + 1)), eps)
    return h


def config_table(compute: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed table derived from the config (positions): computed, or, when the model is being built on the
    meta device, left as an uncomputed tensor of its shape, because running its ops on meta imports
    torch._dynamo (seconds of start-up); load_checkpoint computes it for real afterwards."""
    if torch.get_default_device().type == "meta":
        return torch.empty(shape)
    return compute()
