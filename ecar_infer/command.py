"""What the ecar commands share: ecar-sample (cli.py), ecar-edit (edit_cli.py), ecar-train
(training/train_cli.py), the evaluation scripts and the benchmarks. The user error and the exit statuses,
SIGTERM stopping a command as Ctrl-C does, argument types, the parser whose errors are user errors, option
names spelled with underscores, the checks that an output can be written before any work, the content hash
of a checkpoint or VAE for a run's settings record, and one-line messages and warnings on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

from .atomic import create_temporary
from .checks import MAX_SEED
from .config import ConfigError
from .schedule import MAX_STEPS_PER_STAGE

EXIT_USER_ERROR, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """A mistake the user can fix (the command line, an input file, the output path); one line, status 2."""


# Only these are user errors; any other exception is a bug and keeps its traceback.
def user_errors() -> tuple[type[Exception], ...]:
    """The errors printed as one line with status 2 (imported when needed: `--help` must not load torch)."""
    from .checkpoint import CheckpointError
    from .kernels.dispatch import BackendError
    from .targets import ResumeError
    from .vae import VAEError

    return UsageError, ResumeError, ConfigError, CheckpointError, VAEError, BackendError


# ---- stopping ----------------------------------------------------------------------------------------
def stops_on_sigterm(main):
    """Decorate a command's main so that SIGTERM (a cluster's preemption, `kill`, torchrun stopping its
    workers) stops it as Ctrl-C does: the temporary file of a write under way is removed, what was saved
    stays, and the command's one line says how to resume. Python leaves SIGTERM to kill the process at once
    otherwise. The previous handler is back when main returns (main may run inside a test process)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():   # handlers are set in the main thread only
            return main(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return main(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return run


def _raise_interrupt(signum, frame) -> NoReturn:
    raise KeyboardInterrupt


# ---- argument types ----------------------------------------------------------------------------------
def checked(parse, ok, requirement: str):
    """An argparse type: parse(text), then ok(value), else "must be <requirement>, got <text>"."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value
    return convert


positive_int = checked(int, lambda v: v > 0, "a positive integer")
step_count = checked(int, lambda v: 0 < v <= MAX_STEPS_PER_STAGE, f"an integer in 1..{MAX_STEPS_PER_STAGE}")
seed_int = checked(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED} (2**64-1)")


def steps_spec(text: str) -> int | tuple[int, ...]:
    """'10' (every stage) or '8,10,12' (one per stage)."""
    steps = tuple(step_count(v) for v in text.split(","))
    return steps[0] if len(steps) == 1 else steps


def interval_spec(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not 0.0 <= lo <= hi <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"give LO,HI with 0 <= LO <= HI <= 1 (sigmas), got {text!r}")
    return lo, hi


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are user errors too: one line, status 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def normalize(argv: list[str]) -> list[str]:
    """--cfg_scale -> --cfg-scale (option names only; everything after a bare -- is left alone)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def make_folder(folder: Path, option: str) -> None:
    """Create the output folder `option` names (and its parents), or fail with one line."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"cannot use {option} {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {option} {folder}: {err.strerror or err}") from None


def check_writable_file(target: Path) -> None:
    """Fail if the file `target` cannot be written: a directory, in a folder missing or read-only, or a name
    the file system refuses once the atomic write's temporary name (ecar_infer/atomic.py, 14 characters
    longer; FILE.parts/ is 6) is made of it, which a name of 242-255 bytes passed only to fail after sampling."""
    if target.is_dir():
        raise UsageError(f"cannot write {target}: it is a directory")
    if target.parent.exists() and not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: {target.parent} is a file, not a directory")
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: directory {target.parent} does not exist")
    try:
        create_temporary(target).unlink()
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise UsageError(f"cannot write {target}: the name is too long for the file system once made into "
                             f"the temporary name it is written through (14 characters longer); choose a shorter "
                             f"one") from None
        raise UsageError(f"cannot write to {target.parent}: {err.strerror or err}") from None


def check_writable_folder(folder: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {folder}: {err.strerror or err}") from None


def content_sha256(path: Path) -> str:
    """The sha256 of what a checkpoint or VAE path holds: a file, a sharded checkpoint's index and its shards,
    or every file of a folder (a diffusers VAE), so that a file replaced under the same name is a change. The
    names within a folder count, the path and name of what `path` names do not (a copy is the same)."""
    from .checkpoint import INDEX_SUFFIX

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.name.endswith(INDEX_SUFFIX):  # load_checkpoint has checked the index and its shards
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        files = [path, *(path.parent / name for name in shards)]
    else:
        files = [path]
    base = path if path.is_dir() else path.parent
    digest = hashlib.sha256()
    for file in files:
        digest.update(("" if file == path else str(file.relative_to(base))).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def image_count(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


class StderrHandler(logging.StreamHandler):
    """Writes each record to sys.stderr as it is at that moment (tests and callers may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def warnings_to_stderr(prog: str, shown: bool = True):
    """ecar_infer's warnings (random VAE, unused VAE, ...) print as `PROG: warning: ...` for the duration of
    the command; shown=False keeps them quiet (under torchrun every rank would say the same: rank 0 speaks)."""
    logger = logging.getLogger("ecar_infer")
    others = [h for h in logger.handlers if isinstance(h, StderrHandler)]
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
    handler.setLevel(logging.WARNING if shown else logging.CRITICAL + 1)
    for h in others:
        logger.removeHandler(h)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for h in others:
            logger.addHandler(h)
