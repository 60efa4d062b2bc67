"""Atomic file writes: the helper that the project's outputs (samples, checkpoints, trainer state,
benchmark reports, the latent cache's small files) go through; the latent cache's big array is filled in
place and renamed when complete (training/diskcache.py).

A write goes to a temporary file beside the target and is renamed onto it only when complete, so the
target is either absent, the old file, or the whole new file: never half written (resume logic that
skips finished files relies on this). The temporary file is created with mode 0o666 filtered by the
umask, as open() would create the target itself, not mkstemp's 0600. There is no fsync: this holds when
a process is killed, not when the machine loses power (an fsync per image would cost a 50k-image run on a
GPU more than its sampling). The one exception is make_durable, for a file whose sources are then deleted
(the --npz join, before its batch files go).
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


TOKEN_BYTES = 4   # the random part of a temporary name: 8 hex digits


def temporaries_of(pattern: Path) -> list[Path]:
    """The temporary files create_temporary made for the names `pattern` matches (a glob in its last part):
    what writes cut short by a SIGKILL leave behind."""
    return sorted(pattern.parent.glob(f".{pattern.name}.{'[0-9a-f]' * (2 * TOKEN_BYTES)}.tmp"))


def create_temporary(path: Path) -> Path:
    """A new empty file beside `path`, named `.NAME.XXXXXXXX.tmp`, created with the umask's mode."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(TOKEN_BYTES)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the block to write; rename it onto `path` only if the
    block succeeds (on any exception, KeyboardInterrupt included, the temporary file is removed)."""
    path = Path(path)
    tmp = None
    try:   # from the creation on: an interrupt (Ctrl-C, SIGTERM) right after it must not leave the file
        tmp = create_temporary(path)
        mode = tmp.stat().st_mode
        yield tmp
        os.chmod(tmp, mode)  # in case the writer replaced the file (safetensors does, with mode 0600)
        os.replace(tmp, path)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def make_durable(path: str | os.PathLike) -> None:
    """fsync `path` and its folder (the rename): for a file whose sources are about to be deleted, so that a
    power loss cannot take both (the one place the project pays for an fsync)."""
    path = Path(path)
    _fsync(path, os.O_RDONLY)
    try:   # some file systems refuse to fsync a folder (EINVAL): the file's own sync is what must not fail
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        pass


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
