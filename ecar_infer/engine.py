"""Static buffers and the capturable units of one sampling request shape.

A `StageEngine` is built for one (batch, step structure, dtype) and owns every buffer the request
touches: labels, AdaLN modulations, the static KV cache, per-stage start and end token states, the AR
outputs, all noise and per-step guidance weights. Its units only read and write those buffers, with no
host syncs, no `.item()`, no host->device copies and no data-dependent Python branches, so each can be
captured as a CUDA graph and replayed (ecar_infer/graphs.py); on the CPU they simply run eagerly.
Inputs are copied in by `load` beforehand, outside any graph.

Every unit is idempotent: it overwrites all it writes from buffers it does not write, so running it
again on the same buffers gives the same result (the graph runner's warm-up runs rely on this).
A request of fewer images than the engine's batch is padded; images never interact, so padding rows
cannot change the real ones. With guidance, rows [batch, 2*batch) are the null branch; after the last
stage with a guided step the AR unit runs rows [0, batch) alone (the step structure fixes which stages
those are, so the shapes stay static).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch

from .cache import StaticKVCache
from .editing import EditBuffers
from .kernels import ops
from .kernels.reference import upsample2x
from .model import ECARModel
from .model.ar import trunk_modulation_rows
from .noise import RequestNoise
from .schedule import StageSteps, stage_jumps
from .stages import patchify, unpatchify


def step_structure(steps: list[StageSteps]) -> tuple[tuple[int, tuple[bool, ...]], ...]:
    """What a step plan fixes in the units: per stage, the step count and which steps are guided.

    The guidance weights themselves are loaded into buffers, so plans that differ only in their
    weights (another cfg_scale, the same pattern) share one engine and its graphs.
    """
    return tuple((st.steps, st.guided, st.level) for st in steps)


class StageEngine:
    def __init__(self, model: ECARModel, batch: int, steps: list[StageSteps],
                 edit_modes: tuple[str, ...] | None = None) -> None:
        cfg, plan = model.config, model.plan
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.model, self.plan, self.steps, self.batch = model, plan, steps, batch
        self.structure = step_structure(steps)
        self.key = (batch, self.structure, dtype)  # names this engine's shapes; graph keys extend it
        # the null (unconditional) branch runs through the trunk only up to the last stage with a guided
        # step: no later conditional row attends to it, so later stages run the conditional rows alone
        guided_stages = [s for s, st in enumerate(steps) if st.any_guided]
        self.null_stages = guided_stages[-1] + 1 if guided_stages else 0
        rows = 2 * batch if self.null_stages else batch
        c, d, sides = cfg.latent_channels, cfg.token_dim, plan.latent_sides
        zeros = lambda *shape, dt=dtype: torch.zeros(shape, device=device, dtype=dt)  # noqa: E731
        self.labels = torch.full((rows,), cfg.null_class, device=device, dtype=torch.long)
        self.mods = zeros(trunk_modulation_rows(cfg.depth), rows, cfg.width)
        self.cache = StaticKVCache(cfg.depth, rows, plan.total_tokens, cfg.num_heads, cfg.head_dim, device, dtype)
        self.h = [zeros(2 * batch if s < self.null_stages else batch, n, cfg.width)
                  for s, n in enumerate(plan.tokens)]
        # token states stay fp32 across Euler steps whatever the model dtype; each stage's start state
        # is kept apart from its running state so the flow loop can be rerun from the same start
        self.starts = [zeros(batch, n, d, dt=torch.float32) for n in plan.tokens]
        self.x = [zeros(batch, n, d, dt=torch.float32) for n in plan.tokens]
        self.ups = [None] + [zeros(batch, c, side, side) for side in sides[1:]]
        self.start_noise = zeros(batch, c, sides[0], sides[0], dt=torch.float32)
        self.jump_noise = [zeros(batch, c, side, side, dt=torch.float32) for side in sides[1:]]
        self.weights = [torch.ones(st.steps, batch, device=device) for st in steps]
        self.sigmas = [torch.tensor(st.sigmas, device=device, dtype=torch.float32) for st in steps]
        # shortcut heads: each stage's step-size level, as a tensor so the flow unit reads no host value
        self.levels = [None if st.level is None else torch.tensor([float(st.level)], device=device)
                       for st in steps]
        self.jumps = stage_jumps(plan.num_stages)
        # editing (ecar_infer/editing.py): buffers only for an edit with a stage that is not free; the stage
        # modes are part of the shapes' name, so an edit never replays a plain engine's graphs
        self.edit = None
        if edit_modes is not None and set(edit_modes) != {"free"}:
            self.edit = EditBuffers(plan, batch, edit_modes, device)
            self.key += ("edit", edit_modes)

    def load(self, class_labels: torch.Tensor, noise: RequestNoise, steps: list[StageSteps] | None = None) -> None:
        """Copy a request's labels, noise and guidance weights into the static buffers (outside any graph).

        Up to `batch` images: padding rows get image 0's label and zero noise. `steps` (default: the plan
        the engine was built with) must have the engine's step structure; its guidance weights are used.
        """
        count, b = class_labels.shape[0], self.batch
        if not 0 < count <= b:
            raise ValueError(f"this engine takes 1..{b} images, got {count}")
        steps = self.steps if steps is None else steps
        if step_structure(steps) != self.structure:
            raise ValueError("the step plan's structure (steps, guided steps) differs from this engine's")
        self.labels[:count].copy_(class_labels)
        self.labels[count:b].copy_(class_labels[:1].expand(b - count))
        for buf, src in zip([self.start_noise, *self.jump_noise], [noise.start, *noise.jumps]):
            buf[:count].copy_(src)
            buf[count:].zero_()
        for buf, st in zip(self.weights, steps):
            buf.copy_(torch.tensor(st.guidance, dtype=torch.float32)[:, None].expand(st.steps, b))

    def units(self) -> Iterator[tuple[str, int, Callable[[], None]]]:
        """The request's units in order, as (kind, stage, fn): begin, then per stage ar, flow (for a stage
        an edit keeps wholly: known) and (but after the last) jump."""
        yield "begin", 0, self.begin
        for s in range(self.plan.num_stages):
            yield "ar", s, partial(self.ar_stage, s)
            if self.edit is not None and self.edit.modes[s] == "known":
                yield "known", s, partial(self.known_stage, s)
            else:
                yield "flow", s, partial(self.flow_stage, s)
            if s + 1 < self.plan.num_stages:
                yield "jump", s, partial(self.jump, s)

    # ---- units -------------------------------------------------------------------------------
    def begin(self) -> None:
        """Modulations of the whole request, and the first stage's starting state (pure noise)."""
        self.mods.copy_(self.model.trunk.condition(self.labels))
        self.starts[0].copy_(patchify(self.start_noise, self.model.config.patch_size))

    def ar_stage(self, s: int) -> None:
        """The AR transformer on stage s over the static KV cache; writes h[s] (both branches' rows, or
        after the last guided stage the conditional rows alone)."""
        trunk = self.model.trunk
        rows = self.h[s].shape[0]
        up = self.ups[s]
        if up is not None and rows > self.batch:
            up = torch.cat([up, up])  # both branches see the same previous stage
        tokens = trunk.stage_inputs(s, self.labels[:rows], up)
        self.h[s].copy_(trunk.forward_stage(s, tokens, self.mods[:, :rows], self.cache.first_rows(rows)))

    def flow_stage(self, s: int) -> None:
        """All N_s Euler steps of stage s, guidance included: x[s] goes from starts[s] to the stage's end."""
        head, st, b = self.model.head, self.steps[s], self.batch
        x = self.x[s].copy_(self.starts[s])
        if self.edit is not None:
            self.edit.clamp_start_(s, x)
        dtype = self.h[s].dtype
        h = self.h[s] if st.any_guided else self.h[s][:b]           # an unguided stage needs no null rows
        cond = head.condition(h)                                      # [rows, n, W], fixed for the stage
        temb = head.time_embedding(self.sigmas[s])                    # [N, W]
        if self.levels[s] is not None:
            temb = temb + head.level_embedding(self.levels[s])        # one step size for the whole stage
        for k, guided in enumerate(st.guided):
            if guided:
                v = head.velocity(x.to(dtype).repeat(2, 1, 1), cond + temb[k], s)
                self.euler_step_(s, k, x, v[:b], v[b:], self.weights[s][k], st.dr)
            else:
                v = head.velocity(x.to(dtype), cond[:b] + temb[k], s)
                self.euler_step_(s, k, x, v, None, None, st.dr)

    def euler_step_(self, s: int, k: int, x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None,
                    w: torch.Tensor | None, dr: float) -> None:
        """Step k of stage s in place, guided when v_uncond is given; on a clamped stage of an edit, fused
        with the clamp at the step's new local ratio (docs/MODEL.md, "Editing without retraining")."""
        if self.edit is not None and self.edit.clamps(s):
            r = 1.0 - (k + 1) / self.steps[s].steps  # exactly 0 after the last step
            self.edit.euler_step_(s, x, v_cond, v_uncond, w, dr, r)
        elif v_uncond is None:
            ops.euler_step_(x, v_cond, dr)
        else:
            ops.guided_euler_step_(x, v_cond, v_uncond, w, dr)

    def known_stage(self, s: int) -> None:
        """An edit's stage kept wholly: no flow loop, its end is the known X_end."""
        self.x[s].copy_(self.edit.end[s])

    def jump(self, s: int) -> None:
        """From stage s's end to stage s+1: the AR input Up(x_end) and the re-noised start state starts[s+1]."""
        cfg = self.model.config
        x_end = unpatchify(self.x[s], cfg.patch_size, cfg.latent_channels)
        self.ups[s + 1].copy_(upsample2x(x_end))
        alpha, beta = self.jumps[s]
        x_start = ops.upsample_renoise(x_end, self.jump_noise[s], alpha, beta)
        self.starts[s + 1].copy_(patchify(x_start, cfg.patch_size))

    def final_latent(self) -> torch.Tensor:
        """The last stage's end state as a [B, C, H, W] latent in the scaled latent space."""
        cfg = self.model.config
        return unpatchify(self.x[-1], cfg.patch_size, cfg.latent_channels)
