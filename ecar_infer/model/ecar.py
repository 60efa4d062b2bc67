"""ECARModel: the AR transformer (trunk) and the flow head, with the config they were built from."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ECARConfig
from ..stages import StagePlan
from .ar import ARTransformer
from .head import FlowHead


# AdaLN-Zero: modulations and the head's output start at zero; the shortcut level MLP's output too, so
# that a fresh shortcut head is the flow head at every level (docs/MODEL.md, "Head variants")
ZERO_INIT = ("adaLN", "modulation", "head.out.", "head.level_fc2.")


class ECARModel(nn.Module):
    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = StagePlan(config)
        self.trunk = ARTransformer(config)
        self.head = FlowHead(config)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, zero_init: bool = True) -> "ECARModel":
        """Deterministic initialisation from `seed`.

        zero_init=True is the training init (the ZERO_INIT layers start at 0, so every block starts as
        the identity). zero_init=False gives every weight a random value,
        which makes random-weight sampling and parity tests exercise every path.
        """
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                values = torch.zeros(p.shape) if zero_init else torch.randn(p.shape, generator=gen) * 0.02
            elif "emb" in name:
                values = torch.randn(p.shape, generator=gen) * 0.02
            else:  # Linear weight [out, in]: Xavier-uniform
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            if zero_init and any(key in name for key in ZERO_INIT):
                values = torch.zeros(p.shape)
            p.copy_(values.to(p.dtype))
        return self

    def whole_sequence_inputs(self, class_labels: torch.Tensor, prev_ups: list[torch.Tensor]) -> torch.Tensor:
        """[B, L, D] input tokens of all stages; prev_ups[s-1] is Up(x_end of stage s-1) for s >= 1."""
        parts = [self.trunk.stage_inputs(0, class_labels, None)]
        parts += [self.trunk.stage_inputs(s, class_labels, up) for s, up in enumerate(prev_ups, start=1)]
        return torch.cat(parts, dim=1)

    def config_buffers(self) -> dict[str, torch.Tensor]:
        """The non-persistent buffers derived from the config alone (positions), by module path; a model built
        on the meta device gets them recomputed from here."""
        out = {"trunk.pos": self.trunk.position_table()}
        if hasattr(self.head, "pos"):
            out["head.pos"] = self.head.position_table()
        return out

    def forward_full(self, class_labels: torch.Tensor, prev_ups: list[torch.Tensor]) -> torch.Tensor:
        """AR outputs h under the block-causal mask, [B, P, D], for stage 0 and the stages prev_ups feeds
        (all L tokens when prev_ups covers every later stage)."""
        mods = self.trunk.condition(class_labels)
        return self.trunk.forward_full(self.whole_sequence_inputs(class_labels, prev_ups), mods)
