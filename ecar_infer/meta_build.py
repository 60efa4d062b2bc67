"""Building a module from an untrusted file's config, bounded by the file's own tensor table.

A config (a checkpoint's ECARConfig, a single-file VAE's diffusers config) can ask for any sizes; the
file's safetensors header says what it really holds (names and shapes). `build_within` builds the module
on the meta device (shapes only, nothing allocated) and stops it as soon as it registers more tensors or
elements than BUDGET x what the header holds, so however absurd the config, the work is bounded by the
file. `mismatch` then compares the module's tensors with the header's, by name and shape.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterator, TypeVar

import torch
from torch.nn.modules.module import register_module_buffer_registration_hook, register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode

from .checks import some_of

# The build may register at most this many times the file's tensors, and elements: the stored weights plus
# the config-derived tables that are not stored (a position table), which are far smaller.
BUDGET = 2

M = TypeVar("M", bound=torch.nn.Module)


class BuildError(ValueError):
    """The config cannot be built within what the file holds; the message says why."""


class _OverBudget(Exception):
    """The meta build asked for more tensors or elements than the file's header allows."""


_building = threading.local()  # the budget of the meta build running in this thread, if any


def _count_registration(module: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    budget = getattr(_building, "budget", None)
    if budget is None or tensor is None:
        return
    budget["tensors"] -= 1
    budget["elements"] -= tensor.numel()
    if budget["tensors"] < 0 or budget["elements"] < 0:
        raise _OverBudget


@contextlib.contextmanager
def _registration_budget(tensors: int, elements: int) -> Iterator[None]:
    """Within the block, this thread's modules may register at most `tensors` parameters and buffers of
    at most `elements` elements in all; one more raises _OverBudget from inside the module's __init__."""
    _building.budget = {"tensors": tensors, "elements": elements}
    handles = [register_module_parameter_registration_hook(_count_registration),
               register_module_buffer_registration_hook(_count_registration)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _building.budget = None


class _ShapesOnly(TorchFunctionMode):
    """Skips in-place ops on meta tensors (the modules' random initialisers): there are no values to fill, and
    the meta implementation of most ops is a Python reference (torch._refs) whose first call imports
    torch._dynamo, seconds of start-up for nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def build_within(build: Callable[[], M], shapes: dict[str, tuple[int, ...]]) -> M:
    """build() on the meta device, stopped with a BuildError once it registers more than BUDGET x the
    tensors or elements of `shapes` (the file's tensor table), or when torch cannot hold its sizes."""
    elements = sum(math.prod(shape) for shape in shapes.values())
    return build_bounded(build, BUDGET * len(shapes), BUDGET * elements,
                         f"does not match its config: the config describes a model larger than the {len(shapes)} "
                         f"tensor(s) ({elements:,} elements) the file holds", "its config")


def build_bounded(build: Callable[[], M], tensors: int, elements: int, too_large: str, config_is: str) -> M:
    """build() on the meta device, stopped with BuildError(too_large) once it registers more than `tensors`
    tensors or `elements` elements, or with a BuildError "{config_is} cannot be built: ..." when torch cannot
    hold its sizes."""
    try:
        with _registration_budget(tensors, elements), torch.device("meta"), _ShapesOnly():
            return build()
    except _OverBudget:
        raise BuildError(too_large) from None
    except (RuntimeError, TypeError, ValueError, OverflowError, MemoryError) as err:  # sizes torch cannot hold
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise BuildError(f"{config_is} cannot be built: {first_line}") from None


def mismatch(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What differs between the module's state and the file's tensor table (names, then shapes), or None."""
    expected = module.state_dict()
    problem = names_differ(set(expected) - set(shapes), set(shapes) - set(expected))
    if problem:
        return problem
    return shapes_differ([(n, shapes[n], tuple(t.shape)) for n, t in expected.items()])


def shapes_differ(tensors) -> str | None:
    """The message for the (name, shape in the file, shape the config gives) whose shapes differ; None if none."""
    misshaped = [f"{name} is {list(found)}, expected {list(wanted)}"
                 for name, found, wanted in tensors if tuple(found) != tuple(wanted)]
    return f"{len(misshaped)} tensor(s) with the wrong shape: {some_of(misshaped)}" if misshaped else None


def names_differ(missing, unexpected) -> str | None:
    """The message for tensors the config expects and the file lacks, and the reverse; None if neither."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = [f"{len(missing)} missing tensor(s) {some_of(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected tensor(s) {some_of(unexpected)}"] if unexpected else []
    return f"does not match its config: {'; '.join(parts)}" if parts else None


