"""Arrays computed once and kept on disk as memory-mapped .npy files (decoded image folders, VAE latents).

A cache file is filled chunk by chunk into NAME.partial.npy; after each chunk the rows done are recorded
in NAME.progress, so an interrupted build resumes where it stopped; the finished file is renamed to
NAME.npy, so a reader never sees a half-built array. NAME.json records what the array was computed from
(the key): a cache built from anything else is rebuilt. One process builds at a time: the others (the
other ranks of a torchrun job) wait on a file lock and then find the finished file.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..atomic import atomic_path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (released when the block ends or the process dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _meta_text(key: dict, shape: tuple[int, ...], dtype: np.dtype) -> str:
    return json.dumps({"key": key, "shape": list(shape), "dtype": np.dtype(dtype).str}, sort_keys=True)


def is_cached(path: str | os.PathLike, key: dict, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether cached_array(path, key, shape, dtype, ...) would find its array finished; creates nothing."""
    path = Path(path)
    meta_path = path.with_suffix("").with_suffix(".json")
    return path.exists() and meta_path.exists() and meta_path.read_text() == _meta_text(key, shape, dtype)


def _opened(path: Path, shape: tuple[int, ...], dtype: np.dtype, mode: str) -> np.ndarray | None:
    """The .npy file `path` memory-mapped, or None where it is not a whole array of `shape` and `dtype` (a file
    cut short or written over: the cache's own file, so it is built again rather than refused)."""
    try:
        array = np.lib.format.open_memmap(path, mode="r")   # mode "r+" would lengthen a short file with zeros
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            return None
        return array if mode == "r" else np.lib.format.open_memmap(path, mode=mode)
    except (OSError, ValueError):
        return None


def _rows_done(progress_path: Path, total: int) -> int | None:
    """The rows a progress record counts as done, None where it is not a count of 0..total."""
    try:
        done = int(progress_path.read_text())
    except (OSError, ValueError):
        return None
    return done if 0 <= done <= total else None


def cached_array(path: str | os.PathLike, key: dict, shape: tuple[int, ...], dtype: np.dtype,
                 fill: Callable[[int, int], np.ndarray], chunk: int,
                 report: Callable[[int, int], None] | None = None,
                 discard_on: tuple[type[BaseException], ...] = ()) -> np.ndarray:
    """The read-only memory-mapped array at `path` (a .npy file), built first if it is missing.

    key: what the array is computed from (JSON-able); fill(start, stop): rows [start, stop) of the array;
    report(done, total): called after each chunk (progress display); discard_on: errors of fill after which
    the unfinished build is deleted rather than kept to resume (its inputs must change, and with them the key).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.with_suffix("")
    meta_path, progress_path = stem.with_suffix(".json"), stem.with_suffix(".progress")
    partial = stem.with_name(stem.name + ".partial.npy")
    want = _meta_text(key, shape, dtype)
    with _locked(stem.with_suffix(".lock")):
        same = meta_path.exists() and meta_path.read_text() == want
        finished = _opened(path, shape, dtype, "r") if same and path.exists() else None
        if finished is not None:
            return finished
        done = _rows_done(progress_path, shape[0]) if same and partial.exists() else None
        array = None if done is None else _opened(partial, shape, dtype, "r+")
        if array is None:   # nothing usable (or a damaged file): start afresh
            for stale in (path, partial, progress_path):
                stale.unlink(missing_ok=True)
            _write_text(meta_path, want)
            done = 0
            array = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=tuple(shape))
        total = shape[0]
        try:
            for start in range(done, total, chunk):
                stop = min(start + chunk, total)
                array[start:stop] = fill(start, stop)
                array.flush()
                _write_text(progress_path, str(stop))
                if report:
                    report(stop, total)
        except discard_on:
            del array
            for unusable in (partial, progress_path, meta_path):
                unusable.unlink(missing_ok=True)
            raise
        del array
        os.replace(partial, path)
        progress_path.unlink(missing_ok=True)
        return np.load(path, mmap_mode="r")
