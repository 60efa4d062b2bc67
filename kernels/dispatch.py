"""Per-call backend choice for the hot-path ops (DESIGN.md section 3; a diffusers-style registry).

Each op has backends in preference order (attention: flash -> triton -> sdpa -> reference; every other
op: triton -> reference). A call goes to the first backend that is installed and accepts the call's
device, dtype and shapes. ECAR_BACKEND=<name> or `with force_backend(name):` puts one backend first; a
forced backend that cannot take a call falls back down the usual order, with a one-time warning.
The first use of each (op, backend) pair is logged once, so the log names the backends chosen.
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


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., Any]
    supports: Callable[..., bool]  # called with the op's arguments; True if this backend can run the call


_REGISTRY: dict[str, dict[str, Backend]] = {}
_state = threading.local()
_logged: set[tuple[str, str]] = set()
_chosen: dict[str, str] = {}


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


def register(op: str, backend: str, fn: Callable[..., Any], supports: Callable[..., bool] | None = None) -> None:
    """Register `fn` as `backend`'s implementation of `op`. `supports(*args, **kwargs)` gates each call."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKEND_NAMES}")
    _REGISTRY.setdefault(op, {})[backend] = Backend(backend, fn, supports or _always)


def registered(op: str) -> list[str]:
    """The backends registered for `op`, in preference order."""
    order = PREFERENCE.get(op, DEFAULT_PREFERENCE)
    return [name for name in order if name in _REGISTRY.get(op, {})]


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKEND_NAMES + ('auto',)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by `force_backend` (innermost) or by the ECAR_BACKEND variable, else None."""
    stack = getattr(_state, "stack", None)
    if stack:
        name = stack[-1]
    else:
        name = os.environ.get("ECAR_BACKEND", "auto").strip().lower() or "auto"
        if name not in BACKEND_NAMES + ("auto",):
            raise ValueError(f"ECAR_BACKEND={name!r} is not a backend: choose one of {BACKEND_NAMES + ('auto',)}")
    return None if name == "auto" else name


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Within the block, every op tries backend `name` first ("auto" restores the usual order)."""
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _log_once(op: str, backend: str, message: str, level: int = logging.INFO) -> None:
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        logger.log(level, message)


def select(op: str, *args: Any, **kwargs: Any) -> Backend:
    """The backend that will run this call of `op`."""
    backends = _REGISTRY.get(op)
    if not backends:
        raise KeyError(f"no backend registered for op {op!r}")
    order = registered(op)
    forced = forced_backend()
    if forced is not None and forced in backends:
        order = [forced] + [name for name in order if name != forced]
    for name in order:
        backend = backends[name]
        if backend.supports(*args, **kwargs):
            # Forcing a backend the op never has (sdpa for a LayerNorm) is silent; any other miss is not.
            if forced is not None and name != forced and forced in PREFERENCE.get(op, DEFAULT_PREFERENCE):
                why = "cannot run it for this call" if forced in backends else "is not installed"
                _log_once(op, "!" + forced, f"backend {forced!r} forced for {op} but {why}; using {name!r}",
                          logging.WARNING)
            return backend
    raise RuntimeError(f"no backend can run {op} for these inputs (tried {order})")


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
