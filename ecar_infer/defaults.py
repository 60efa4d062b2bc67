"""Sampling defaults: the engine's, a shortcut head's, or a checkpoint's recommended_* metadata.

The metadata is checked when a checkpoint is saved and when it is loaded (ecar_infer/checkpoint.py), so a
bad entry is a CheckpointError, never a failure at the first generate().
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .checks import guidance_weight
from .config import ECARConfig
from .schedule import CFG_SCHEDULES, plan_for

SHORTCUT_DEFAULT_STEPS = 4
RECOMMENDED_KEYS = ("recommended_cfg", "recommended_steps", "recommended_cfg_schedule", "recommended_cfg_interval")
_STEPS = re.compile(r"[0-9]{1,4}(,[0-9]{1,4})*")  # "2" or "1,2,2"
_SIGMA = r"[01](\.[0-9]{1,16})?"
_INTERVAL = re.compile(f"{_SIGMA},{_SIGMA}")  # "0.55,1"


def close_recommended_key(key: str) -> list[str]:
    """[the recommended_* key that `key` is a typo of], or [] (for a right key too): another case or a dash for
    an underscore, or one letter added, dropped or changed (two in the long cfg_schedule and cfg_interval keys),
    so that keys of their own such as recommended_seeds or recommended_cpu stay free."""
    spelt = key.lower().replace("-", "_")
    return [known for known in RECOMMENDED_KEYS
            if key != known and _edit_distance(spelt, known) <= (2 if len(known) >= 20 else 1)][:1]


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest letters added, dropped or changed to turn `a` into `b`."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults of generate(); a checkpoint's recommended_* metadata overrides them."""

    cfg_scale: float = 1.0
    steps_per_stage: int | tuple[int, ...] = 20
    cfg_schedule: str = "constant"
    cfg_interval: tuple[float, float] | None = None  # guide only where lo <= sigma <= hi; None: everywhere

    def guidance_interval(self, given: tuple[float, float] | None = None) -> tuple[float, float] | None:
        """The checked interval a request guides in: `given`, else this default; None where that is
        everywhere ((0, 1) too), so that spelling out "everywhere" is no change."""
        interval = self.cfg_interval if given is None else tuple(given)
        return None if interval in (None, (0.0, 1.0)) else interval

    @classmethod
    def for_config(cls, config: ECARConfig | None) -> "SamplingDefaults":
        """A shortcut head samples in few steps: 4 per stage unless its checkpoint recommends otherwise."""
        return cls(steps_per_stage=SHORTCUT_DEFAULT_STEPS) if config is not None and config.shortcut else cls()

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], config: ECARConfig | None = None) -> "SamplingDefaults":
        """The defaults a checkpoint's metadata recommends; with `config`, also checked against the model
        (stage count, a shortcut head's step grid). A bad entry raises ValueError naming it."""
        out = cls.for_config(config)
        if "recommended_cfg" in metadata:
            value = metadata["recommended_cfg"]
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(f"recommended_cfg must be a finite number, got {value!r}")
            cfg_scale = guidance_weight(number, "recommended_cfg")
            out = replace(out, cfg_scale=cfg_scale)
        if "recommended_steps" in metadata:
            value = str(metadata["recommended_steps"])
            if not _STEPS.fullmatch(value):
                raise ValueError(f"recommended_steps must be one step count or one per stage, comma-separated "
                                 f"(\"2\" or \"1,2,2\"), got {value!r}")
            steps = tuple(int(v) for v in value.split(","))
            out = replace(out, steps_per_stage=steps[0] if len(steps) == 1 else steps)
        if "recommended_cfg_schedule" in metadata:
            if metadata["recommended_cfg_schedule"] not in CFG_SCHEDULES:
                raise ValueError(f"recommended_cfg_schedule must be one of {CFG_SCHEDULES}, "
                                 f"got {metadata['recommended_cfg_schedule']!r}")
            out = replace(out, cfg_schedule=metadata["recommended_cfg_schedule"])
        if "recommended_cfg_interval" in metadata:
            value = str(metadata["recommended_cfg_interval"])
            bounds = tuple(float(v) for v in value.split(",")) if _INTERVAL.fullmatch(value) else ()
            if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
                raise ValueError(f"recommended_cfg_interval must be two sigmas LO,HI with 0 <= LO <= HI <= 1 "
                                 f"(\"0.55,1\"), got {value!r}")
            out = replace(out, cfg_interval=bounds)
        if config is not None:
            try:
                plan_for(config, out.steps_per_stage, out.cfg_scale, out.cfg_schedule)
            except ValueError as err:
                raise ValueError(f"recommended_steps={metadata.get('recommended_steps')!r} does not fit this "
                                 f"model: {err}") from None
        return out
