"""Type checks of the values a caller passes to the sampler (labels, seeds, steps, guidance), and the
bounded reading of small files (records, configs, JSON).

Light on purpose: schedule.py uses it and `ecar-sample --help` must not import torch.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import stat
import sys
from collections.abc import Iterable
from typing import BinaryIO

MAX_SEED = 2**64 - 1   # torch.Generator.manual_seed's range (negative seeds would alias large ones)
MAX_RECORD_BYTES = 1 << 20   # a settings record or a config file: a few kB in practice
MAX_HEADER_BYTES = 16 << 20   # of a safetensors file we read: an E-CAR header is its tensor table (34 kB for ecar-xl),
                              # config and class names (30 kB for 1,000), SD-VAE's about 30 kB; safetensors' own
                              # bound, 100 MB, takes it ~2 s and hundreds of MB to parse


def safetensors_header_length(path: str | os.PathLike) -> int | None:
    """The header length a safetensors file starts with, or None where the file does not look like one (a
    safetensors file begins with its header's length, then "{")."""
    with open(path, "rb") as f:
        head = f.read(9)
    return int.from_bytes(head[:8], "little") if len(head) == 9 and head[8:9] == b"{" else None


def oversized_header(path: str | os.PathLike, what: str) -> str | None:
    """Why the safetensors file `path` is not read ("safetensors header is ... bytes, ..."), where its header is
    larger than `what` can need."""
    length = safetensors_header_length(path)
    if length is not None and length > MAX_HEADER_BYTES:
        return (f"safetensors header is {length:,} bytes, more than {what} can need ({MAX_HEADER_BYTES:,}); "
                f"it is not read")
    return None


def is_integer(value) -> bool:
    """An int or numpy integer (bool excluded: True is no class label, seed or step count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integers(name: str, values, expected: str = "a sequence of integers") -> list[int]:
    """A sequence (or integer tensor) of integers as a list of ints; anything else is an error that says
    what was `expected`."""
    torch = sys.modules.get("torch")  # a tensor can only be given once torch is imported
    numpy = sys.modules.get("numpy")
    if torch is not None and isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got a tensor of {values.dtype}")
        if values.dim() != 1:
            raise ValueError(f"{name} must be {expected}: a tensor of one dimension, got shape {tuple(values.shape)}")
        return values.tolist()
    if numpy is not None and isinstance(values, numpy.ndarray):
        if values.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got an array of {values.dtype}")
        if values.ndim != 1:
            raise ValueError(f"{name} must be {expected}: an array of one dimension, got shape {values.shape}")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be {expected}, got {values!r}")
    if isinstance(values, (set, frozenset, dict)):   # no order: which image gets which value would be chance
        raise ValueError(f"{name} must be {expected} in order, got a {type(values).__name__}; give a list")
    values = list(values)
    bad = [v for v in values if not is_integer(v)]
    if bad:
        raise ValueError(f"{name} must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(v) for v in values]


def is_finite_real(value) -> bool:
    """A finite int or float (numpy scalars included); not a bool, a string, or an int beyond a float's range
    (10**400: math.isfinite would raise OverflowError)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def finite_real(name: str, value) -> float:
    """A finite int or float (numpy scalars included; bool and strings are errors)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not is_finite_real(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


# The largest float32: guidance is computed in float32 (bf16 shares its range), so a weight beyond it is inf
FLOAT32_MAX = 3.4028234663852886e38


# Guidance is useful up to about 10; far beyond, the images only saturate, and further still (about 1e20 on the
# shipped models, measured) float32 overflows inside the model and the images come out NaN, written as black
MAX_GUIDANCE = 1e4


def guidance_weight(value, name: str = "cfg_scale") -> float:
    """A classifier-free guidance weight: a finite number of magnitude at most MAX_GUIDANCE."""
    weight = finite_real(name, value)
    if abs(weight) > MAX_GUIDANCE:
        raise ValueError(f"{name} must be within -10,000..10,000 (guidance of 1-10 is usual; far beyond, float32 "
                         f"overflows in the model and the images are NaN), got {value}")
    return weight


def switches(**named) -> None:
    """Refuse a switch given as anything but True or False: a string "false" or "no" is true to Python, and
    compile="false" would compile for minutes."""
    for name, value in named.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading; ValueError unless it is a regular file: opening a FIFO waits for a
    writer, forever, and in a Ctrl-C handler past the signal too (opened without waiting, then checked)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ValueError(f"{path} is not a regular file (a FIFO, a device or a folder)")
    return f


def read_record(path: str | os.PathLike, limit: int = MAX_RECORD_BYTES, pipes: bool = False) -> str:
    """The text of a small file this program or its user wrote (a settings record, a config): at most `limit`
    bytes of a regular file, or with `pipes` of a pipe too (a config the user gives as `<(...)`, whose writer
    is theirs); OSError or ValueError otherwise."""
    with (open(path, "rb") if pipes else open_regular(path)) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes, which no record or config of ecar_infer is")
    return data.decode("utf-8")


def parse_json(text: str | bytes):
    """json.loads for text from a file: whatever is not JSON raises ValueError (JSONDecodeError, bad UTF-8,
    an integer too long to convert), text nested past the parser's recursion limit included."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def some_of(items, limit: int = 4) -> str:
    """'a, b, c' or, past `limit` items, 'a, b and N more': the items an error names."""
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
