"""Backend choice for the hot-path ops (docs/KERNELS.md; a diffusers-style registry).

Each op has backends in preference order (attention: flash -> triton -> sdpa -> reference; every other
op: triton -> reference). A call goes to the first backend that is installed and accepts the call's
device, dtype and shapes. ECAR_BACKEND=<name> or `with force_backend(name):` puts one backend first; a
forced backend that cannot take a call falls back down the usual order, with a one-time warning.
The first use of each (op, backend) pair is logged once, so the log names the backends chosen.

The choice is made in two steps, so that a call costs little more than the op itself:
* once per (op, device, dtype, forced backend): the backends whose `accepts(device, dtype)` gate passes,
  in order (cached; device and dtype are those of the call's first tensor);
* per call: the first of those whose `supports(*args)` check takes the call's shapes and layouts (most
  backends have no such check), so a backend that refuses one call still gets the next.
ECAR_BACKEND is read once, at the first call; `reread_environment()` reads it again.
A call that autograd records (grad mode on, an input that requires grad: training) goes only to the
backends with a backward (DIFFERENTIABLE), whatever is forced.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger("ecar_infer.kernels")

BACKEND_NAMES = ("flash", "triton", "sdpa", "reference")
ATTENTION_OPS = ("stage_attention", "block_causal_attention")
PREFERENCE = {op: ("flash", "triton", "sdpa", "reference") for op in ATTENTION_OPS}
DEFAULT_PREFERENCE = ("triton", "reference")
# the backends with a backward pass: a call that autograd records (training) goes to one of them
DIFFERENTIABLE = ("sdpa", "reference")
# Why a backend may be missing from the registry (kernels/__init__.py registers what can run here)
NOT_REGISTERED = {
    "flash": "is not available (it needs the flash-attn package)",
    "triton": "is not available here (it needs a CUDA GPU, or TRITON_INTERPRET=1 set before ecar_infer is imported "
              "to interpret it on the CPU)",
    "sdpa": "is not registered", "reference": "is not registered",
}


class BackendError(ValueError):
    """ECAR_BACKEND names no backend (a user's setting, reported as such by the command-line tools)."""


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., Any]
    supports: Callable[..., bool]              # called with the op's arguments: can this backend run the call?
    accepts: Callable[[torch.device, torch.dtype], bool]  # can it run anything on this device and dtype?
    checks_calls: bool                          # False where supports accepts every call (nothing to ask)


_REGISTRY: dict[str, dict[str, Backend]] = {}
class _ForcedStack(threading.local):
    """Each thread's stack of force_backend() names, innermost last."""

    def __init__(self) -> None:
        self.names: list[str] = []


_forced = _ForcedStack()
_logged: set[tuple[str, str]] = set()
_chosen: dict[str, str] = {}
# (op, device, dtype, forced) -> the backends that accept that device and dtype, in the order tried
_candidates: dict[tuple, tuple[Backend, ...]] = {}
_UNREAD = object()
_env_backend: Any = _UNREAD  # ECAR_BACKEND as read at the first call (None for auto)


def register(op: str, backend: str, fn: Callable[..., Any], supports: Callable[..., bool] | None = None,
             accepts: Callable[[torch.device, torch.dtype], bool] | None = None) -> None:
    """Register `fn` as `backend`'s implementation of `op`.

    accepts(device, dtype) is the backend's fixed gate, asked once per device and dtype (of the call's
    first tensor); supports(*args, **kwargs) is asked at every call the gate lets through. Both default
    to "always".
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKEND_NAMES}")
    _REGISTRY.setdefault(op, {})[backend] = Backend(backend, fn, supports or _always, accepts or _always,
                                                    supports is not None)
    _candidates.clear()


def registered(op: str) -> list[str]:
    """The backends registered for `op`, in preference order."""
    order = PREFERENCE.get(op, DEFAULT_PREFERENCE)
    return [name for name in order if name in _REGISTRY.get(op, {})]


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKEND_NAMES + ('auto',)}")
    return name


def reread_environment() -> None:
    """Read ECAR_BACKEND again at the next call (it is otherwise read once per process)."""
    global _env_backend
    _env_backend = _UNREAD


def _environment_backend() -> str | None:
    global _env_backend
    if _env_backend is _UNREAD:
        name = os.environ.get("ECAR_BACKEND", "auto").strip().lower() or "auto"
        if name not in BACKEND_NAMES + ("auto",):
            raise BackendError(f"ECAR_BACKEND={name!r} is not a backend: set it to one of "
                               f"{BACKEND_NAMES + ('auto',)}, or unset it")
        _env_backend = None if name == "auto" else name
    return _env_backend


def forced_backend() -> str | None:
    """The backend forced by `force_backend` (innermost) or by the ECAR_BACKEND variable, else None."""
    if _forced.names:
        name = _forced.names[-1]
        return None if name == "auto" else name
    return _environment_backend()


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Within the block, every op tries backend `name` first ("auto" restores the usual order)."""
    _check_name(name)
    _forced.names.append(name)
    try:
        yield
    finally:
        _forced.names.pop()


def _log_once(op: str, backend: str, message: str, level: int = logging.INFO) -> None:
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        logger.log(level, message)


def _resolve(op: str, device: torch.device, dtype: torch.dtype, forced: str | None) -> tuple[Backend, ...]:
    """The backends that may run `op` on this device and dtype, in the order they are tried (cached)."""
    key = (op, device, dtype, forced)
    found = _candidates.get(key)
    if found is None:
        backends = _REGISTRY[op]
        order = registered(op)
        if forced is not None and forced in backends:
            order = [forced] + [name for name in order if name != forced]
        found = _candidates[key] = tuple(backends[n] for n in order if backends[n].accepts(device, dtype))
    return found


def select(op: str, *args: Any, **kwargs: Any) -> Backend:
    """The backend that will run this call of `op`."""
    if op not in _REGISTRY:
        raise KeyError(f"no backend registered for op {op!r}")
    forced = forced_backend()
    first = args[0]
    # Triton and flash-attn kernels have no backward: under autograd they would cut the gradient silently
    grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    for backend in _resolve(op, first.device, first.dtype, forced):
        if grad and backend.name not in DIFFERENTIABLE:
            continue
        if not backend.checks_calls or backend.supports(*args, **kwargs):
            # Forcing a backend the op never has (sdpa for a LayerNorm) is silent; any other miss is not.
            if forced is not None and backend.name != forced and forced in PREFERENCE.get(op, DEFAULT_PREFERENCE):
                why = "cannot run it for this call" if forced in _REGISTRY[op] else NOT_REGISTERED[forced]
                _log_once(op, "!" + forced, f"backend {forced!r} forced for {op} but {why}; using {backend.name!r}",
                          logging.WARNING)
            return backend
    raise RuntimeError(f"no backend can run {op} for these inputs (tried {registered(op)})")


def call(op: str, *args: Any, **kwargs: Any) -> Any:
    if torch.compiler.is_compiling():
        # Inside torch.compile: plain torch ops that the compiler fuses itself (SDPA for attention), and no
        # thread-local or logging bookkeeping for it to trace, which would break the graph at every call.
        backends = _REGISTRY[op]
        return backends.get("sdpa", backends["reference"]).fn(*args, **kwargs)
    backend = select(op, *args, **kwargs)
    _chosen[op] = backend.name
    _log_once(op, backend.name, f"ecar_infer: {op} -> {backend.name}")
    return backend.fn(*args, **kwargs)


def chosen_backends() -> dict[str, str]:
    """The backend each op used on its most recent call (for logs, benchmarks and tests)."""
    return dict(_chosen)


def clear_chosen_backends() -> None:
    """Forget the record of chosen_backends, so that it names only the ops called after this."""
    _chosen.clear()
