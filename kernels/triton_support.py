"""What the Triton backends share: whether kernels are interpreted, and the device/dtype gate of every
Triton `supports` predicate.

Import this module only after `import triton` has succeeded (kernels/__init__.py does).
"""
from __future__ import annotations

import torch
import triton

from . import INTERPRETING, dispatch  # INTERPRETING is read once, in kernels/__init__.py

CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)  # bf16 arithmetic gives garbage in the interpreter


def dtypes_on(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes Triton kernels take on `device` (none where they cannot run there).

    On the CPU the interpreter runs only when Triton is forced (ECAR_BACKEND=triton or
    force_backend("triton")): it is a test tool, far slower than the reference, never an automatic choice.
    """
    if device.type == "cuda" and not INTERPRETING:
        return CUDA_DTYPES
    if device.type == "cpu" and INTERPRETING and dispatch.forced_backend() == "triton":
        return INTERPRETER_DTYPES
    return ()


def accepts(device: torch.device, dtype: torch.dtype) -> bool:
    """The dispatch's once-per-(device, dtype) gate of every Triton backend."""
    return dtype in dtypes_on(device)


def runs_on(*tensors: torch.Tensor) -> bool:
    """True if Triton can take these tensors: one device, and a dtype the kernels handle there."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return False
    dtypes = dtypes_on(device)
    return all(t.dtype in dtypes for t in tensors)


def same_dtype(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == tensors[0].dtype for t in tensors)


def rows(t: torch.Tensor) -> torch.Tensor:
    """t as a [rows, last dim] matrix with unit column stride (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def flat(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous 1-D tensor (a view when t is already contiguous)."""
    return t.contiguous().view(-1)
