"""The noise schedule of docs/MODEL.md: stage windows, the re-noise jump, Euler grids, guidance.

Conventions: sigma in [0, 1], sigma = 1 is pure noise, x_sigma = (1 - sigma) * x0 + sigma * eps.
Stage indices are 0-based here (stage s here is stage s+1 in docs/MODEL.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .checks import finite_real, integers, is_integer

if TYPE_CHECKING:
    import torch

# a bound that no sane request reaches (DiT samples in at most 1000 steps in all), so that a typo cannot ask
# for a step table of terabytes
MAX_STEPS_PER_STAGE = 1000
CFG_SCHEDULES = ("constant", "linear")
# a step's sigma within this of a guidance-interval bound counts as on it: window starts come out of float64
# arithmetic (S = 3's last stage starts at 0.5000000000000001, not the table's 0.5), so a bound typed from
# the table would otherwise miss the step it names
INTERVAL_TOLERANCE = 1e-6


def stage_end(s: int, num_stages: int) -> float:
    """Nominal end sigma e_s = 1 - (s+1)/S of stage s (0-based); the last stage ends at 0."""
    return 1.0 - (s + 1) / num_stages


def jump_coefficients(c: float) -> tuple[float, float]:
    """(alpha, beta) of the re-noise jump from a stage that ended at signal level c = 1 - e."""
    return 1.0 / (2.0 - c), math.sqrt(3.0) * (1.0 - c) / (2.0 - c)


def stage_windows(num_stages: int) -> list[tuple[float, float]]:
    """[(start_s, end_s)] for every stage: stage 0 starts at 1, stage s+1 at 1 - alpha*c of stage s."""
    windows = []
    start = 1.0
    for s in range(num_stages):
        end = stage_end(s, num_stages)
        windows.append((start, end))
        c = 1.0 - end
        alpha, _ = jump_coefficients(c)
        start = 1.0 - alpha * c
    return windows


def stage_jumps(num_stages: int) -> list[tuple[float, float]]:
    """[(alpha, beta)] for the jump after each stage but the last."""
    return [jump_coefficients(1.0 - stage_end(s, num_stages)) for s in range(num_stages - 1)]


def euler_ratios(steps: int) -> torch.Tensor:
    """Local ratios r_k = 1 - k/N, k = 0..N (r = 1 is the stage start, r = 0 its end), float64."""
    import torch  # here, not at the top: `ecar-sample --help` imports this module and must not wait for torch

    return 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps


def global_sigma(r: torch.Tensor | float, window: tuple[float, float]) -> torch.Tensor | float:
    """t = e_s + r * (start_s - e_s): the global sigma of local ratio r inside a stage window."""
    start, end = window
    return end + r * (start - end)


def stage_guidance(cfg_scale: float, schedule: str, s: int, num_stages: int) -> float:
    """w_s for stage s: constant w, or linear from 1 at the first stage to w at the last."""
    if schedule == "constant":
        return float(cfg_scale)
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * (s / (num_stages - 1) if num_stages > 1 else 1.0)
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class StageSteps:
    """Everything the flow loop of one stage needs, fixed before sampling starts."""

    steps: int
    window: tuple[float, float]
    sigmas: tuple[float, ...]     # global sigma at each of the N evaluations
    guidance: tuple[float, ...]   # guidance weight at each evaluation (1.0 means unguided)
    level: int | None = None      # shortcut heads: the step-size level log2(steps); None for flow heads

    @property
    def dr(self) -> float:
        """Uniform Euler step in the local ratio: r_(k+1) - r_k = -1/N."""
        return -1.0 / self.steps

    @property
    def guided(self) -> tuple[bool, ...]:
        return tuple(w != 1.0 for w in self.guidance)

    @property
    def any_guided(self) -> bool:
        return any(self.guided)


def shortcut_level(steps: int, max_level: int) -> int:
    """The level l = log2(steps) of a shortcut head sampled with `steps` steps of size 2^-l per stage."""
    level = steps.bit_length() - 1
    if steps != 1 << level or level > max_level:
        allowed = ", ".join(str(1 << k) for k in range(max_level + 1))
        raise ValueError(f"a shortcut head takes a power of two steps per stage, at most 2^{max_level} "
                         f"(its finest trained level): one of {allowed}; got {steps}")
    return level


def plan_steps(num_stages: int, steps_per_stage: int | Sequence[int], cfg_scale: float = 1.0,
               cfg_schedule: str = "constant", cfg_interval: tuple[float, float] | None = None,
               shortcut_max_level: int | None = None) -> list[StageSteps]:
    """Per-stage step tables. steps_per_stage is one int for all stages or one per stage.

    cfg_interval=(lo, hi) applies guidance only at evaluations whose global sigma t has lo <= t <= hi.
    shortcut_max_level: for a shortcut head, its finest level; each stage's step count must then be a
    power of two up to 2^shortcut_max_level, and the plan carries the level the head is told.
    """
    if is_integer(steps_per_stage):
        steps = [int(steps_per_stage)] * num_stages
    else:
        steps = integers("steps_per_stage", steps_per_stage, "an integer or a sequence of integers")
        if len(steps) != num_stages:
            raise ValueError(f"steps_per_stage has {len(steps)} entries but the model has {num_stages} stages; "
                             f"give one int or exactly {num_stages}")
    if any(n <= 0 for n in steps):
        raise ValueError(f"steps_per_stage must be positive, got {steps}")
    if any(n > MAX_STEPS_PER_STAGE for n in steps):
        raise ValueError(f"steps_per_stage must be at most {MAX_STEPS_PER_STAGE} per stage, got {steps}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    if cfg_interval is not None:
        if isinstance(cfg_interval, (str, bytes)) or not hasattr(cfg_interval, "__len__") or len(cfg_interval) != 2:
            raise ValueError(f"cfg_interval must be a pair (lo, hi) of sigmas, got {cfg_interval!r}")
        cfg_interval = lo, hi = tuple(finite_real("cfg_interval", v) for v in cfg_interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {cfg_interval}")
    plans = []
    for s, (n, window) in enumerate(zip(steps, stage_windows(num_stages))):
        sigmas = tuple(float(global_sigma(r, window)) for r in euler_ratios(n)[:-1].tolist())
        w_s = stage_guidance(cfg_scale, cfg_schedule, s, num_stages)
        guidance = tuple(w_s if cfg_interval is None
                         or cfg_interval[0] - INTERVAL_TOLERANCE <= t <= cfg_interval[1] + INTERVAL_TOLERANCE
                         else 1.0 for t in sigmas)
        level = None if shortcut_max_level is None else shortcut_level(n, shortcut_max_level)
        plans.append(StageSteps(n, window, sigmas, guidance, level))
    return plans


def plan_for(config, steps_per_stage: int | Sequence[int], cfg_scale: float = 1.0, cfg_schedule: str = "constant",
             cfg_interval: tuple[float, float] | None = None) -> list[StageSteps]:
    """plan_steps for a model config: its stage count, and for a shortcut head its level grid."""
    return plan_steps(config.num_stages, steps_per_stage, cfg_scale, cfg_schedule, cfg_interval,
                      config.shortcut_max_level if config.shortcut else None)
