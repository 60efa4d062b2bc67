"""The work folder of an ecar-train run (--workdir, default runs/<data name>) and its resume records.

The work folder belongs to one run: a command that finds a run's state there continues it with --resume
and is refused without it, and a --resume whose settings differ from the run's record
(<workdir>/settings.json: the config, the data's identity, the optimisation settings; training_record) is
refused, naming them. The folder holds the resume state (state.safetensors, ecar_infer/training/trainer.py),
the EMA checkpoint (ema.safetensors), loss.csv and loss.png, and samples/stepNNNNNNN.png, grids of EMA
samples, one row per class (for 10 evenly spaced classes when there are more). Also here: the lines printed
when a run is interrupted or diverges, which name what the folder holds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
from pathlib import Path

from ..checks import MAX_HEADER_BYTES, open_regular, parse_json
from ..command import UsageError, check_writable_file, check_writable_folder, content_sha256, make_folder
from ..config import ECARConfig
from ..weights import checkpoint_path
from .trainer import Diverged, TrainSettings


STATE_FILE = "state.safetensors"
EMA_FILE = "ema.safetensors"
LOG_FILE = "loss.csv"
PLOT_FILE = "loss.png"
SAMPLES_DIR = "samples"
SETTINGS_FILE = "settings.json"   # the record of what decides the trained numbers (training_record)


def default_workdir(data: str) -> str:
    """runs/<data name>: the --data folder's name or file's stem (runs/digits32 for the built-in set)."""
    path = Path(data).resolve()
    return str(Path("runs") / (path.stem if path.is_file() else path.name))


def final_path(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path(args.workdir) / "final.safetensors"


def check_outputs(workdir: Path, final: Path, data: str) -> None:
    """Fail before any work if the work folder or the final checkpoint cannot be written, if the final
    checkpoint would replace one of the files the run keeps in its work folder, or if either lies inside the
    image folder --data (its sample grids and loss plot would become training images, and a resume would
    then find other data)."""
    folder = Path(data)
    if folder.is_file() and final.resolve() == folder.resolve():
        raise UsageError(f"--out {final} is the data set --data {data}: the final checkpoint would replace it; "
                         f"choose another file")
    if folder.is_dir():
        for option, path in (("--workdir", workdir), ("--out", final)):
            if path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents:
                default = (" (the default: runs/<data name> in the current folder)"
                           if option == "--workdir" and str(path) == default_workdir(data) else "")
                raise UsageError(f"{option} {path}{default} lies inside the image folder --data {data}, whose every "
                                 f"image is training data: give {option} outside it")
    for kept in (STATE_FILE, EMA_FILE):
        if final.resolve() == (workdir / kept).resolve():
            raise UsageError(f"--out {final}: that is the work folder's {kept}, which the run keeps writing; "
                             f"choose another file")
    make_folder(workdir, "--workdir")
    check_writable_folder(workdir)
    check_writable_file(final)


@contextlib.contextmanager
def removed_if_left_empty(folder: Path):
    """If the block fails (a user error, Ctrl-C), remove `folder` where the block created it and left it
    empty (empty sub-folders, and the lock files of caches no longer there, aside), and the parents created
    for it: a refused run leaves no debris, and a folder that existed before, or holds a file, stays."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]   # the innermost first
    try:
        yield
    except BaseException:
        if created:
            for lock in folder.rglob("*.lock"):   # a cache build discarded on bad data leaves its lock alone
                if not [p for p in lock.parent.glob(glob.escape(lock.stem) + ".*") if p != lock]:
                    lock.unlink(missing_ok=True)
            for path in [*sorted(folder.rglob("*"), reverse=True), *created]:   # sub-folders before their parents
                with contextlib.suppress(OSError):
                    path.rmdir()   # refused for a file or a folder that is not empty
        raise


def saved_step(state: Path) -> int | None:
    """The step of the resume state `state` (from its metadata alone), None if there is none; a state that
    cannot be read is a user error (it is the work folder's, which the user can delete)."""
    if not state.exists():
        return None
    try:
        step = int(header_metadata(state)["step"])
        if step < 0:
            raise ValueError(f"its step {step} is negative")
        return step
    except (OSError, KeyError, ValueError) as err:
        raise unreadable_state(state, "no step in its metadata" if isinstance(err, KeyError) else err) from None


def unreadable_state(state: Path, why: str | Exception) -> UsageError:
    """The one-line error of a resume state that cannot be used (it is the work folder's, which the user can
    delete): `why`, or the error that says it, in one line."""
    why = " ".join(str(why).split())[:200]
    return UsageError(f"the resume state {state} cannot be read ({why}): delete it to start over, or choose "
                      f"another --workdir")


def header_metadata(path: Path) -> dict[str, str]:
    """The metadata of the .safetensors file `path`, from its header, in plain Python: saved_step also runs in
    the Ctrl-C handler, which may have interrupted the import of torch (safetensors' reader imports it again).
    ValueError if the file is not a whole safetensors file."""
    with open_regular(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        size = int.from_bytes(f.read(8), "little")
        if size > file_size - 8:   # a damaged length: read as is, an OverflowError or a MemoryError
            raise ValueError(f"its header length {size} is beyond the file's {file_size} bytes")
        if size > MAX_HEADER_BYTES:   # a state's header is its tensor table: parsing a damaged one took ~30x its size
            raise ValueError(f"its header is {size:,} bytes, more than a training state's can need")
        header = parse_json(f.read(size))
    try:
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        metadata = header.get("__metadata__") or {}
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
                and all(type(end) is int for end in ends)):
            raise TypeError
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError("its header does not describe safetensors tensors") from None
    data_end = max(ends, default=0)
    if 8 + size + data_end != file_size:
        raise ValueError(f"it has {file_size} bytes where its header describes {8 + size + data_end}")
    return metadata


def training_record(args: argparse.Namespace, config: ECARConfig, settings: TrainSettings, data=None) -> dict:
    """What decides the trained numbers, with every default resolved (spelling out a default is no
    change), for the settings record: a --resume must agree on all of it. Without `data`, all but the
    data's identity (what a resume can check before the data opens)."""
    record = {**{f"config.{k}": v for k, v in config.to_dict().items()}, **dataclasses.asdict(settings),
              "flip": args.flip, "init_sha256": content_sha256(checkpoint_path(args.init)) if args.init else None}
    return record if data is None else {**record, "data": data.identity()}


# settings added after runs were recorded without them: such a run trained with the value given here
SETTINGS_ADDED_SINCE = {"stage_noise": "independent"}


def check_same_run(workdir: Path, settings: dict, unknown: tuple[str, ...] = ()) -> int | None:
    """Refuse to resume the run in `workdir` with settings other than its record's, --steps aside (a run
    may be extended: the schedule then spans the new count), and `unknown` (settings not known yet); returns
    the recorded --steps. A state saved before the record was kept has none: it resumes (None), and the
    record is written then."""
    from ..targets import differing_settings, read_settings

    record = workdir / SETTINGS_FILE
    if not record.exists():
        return None
    try:
        saved = read_settings(record)
    except (OSError, ValueError) as err:
        raise UsageError(f"{record} cannot be read ({err}); delete it to resume with this command's settings") from None
    saved = {**SETTINGS_ADDED_SINCE, **saved}
    differ = [name for name in differing_settings(saved, settings) if name not in ("steps", *unknown)]
    if differ:
        named = [what_differs(name, saved.get(name), settings.get(name)) for name in differ]
        raise UsageError(f"{workdir} holds a run with other settings ({', '.join(named)}): resume it with the "
                         f"settings in {record}, choose another --workdir, or delete {workdir}")
    return saved.get("steps")


def what_differs(name: str, saved, now) -> str:
    """A differing setting as a refused resume names it: the data with what in it differs (its image count
    with both values), the --init checkpoint with what to do (a shipped model updated since the run began
    refused the command that Ctrl-C says to rerun), everything else by its name."""
    if name == "init_sha256":
        return "init_sha256: the --init checkpoint is not the one the run began from, and a resume does not read it: " \
               "leave --init out"
    if name != "data" or not isinstance(saved, dict) or not isinstance(now, dict):
        return name
    parts = [f"images {saved.get(key)} in the run, {now.get(key)} now" if key == "images" else key
             for key in sorted(saved.keys() | now.keys()) if saved.get(key) != now.get(key)]
    return f"data: {', '.join(parts)}"


def recorded_settings(workdir: Path) -> dict:
    """The settings record of the run in `workdir`, {} where there is none (or one check_same_run will report
    as unreadable)."""
    from ..targets import read_settings

    try:
        return read_settings(workdir / SETTINGS_FILE)
    except (OSError, ValueError):
        return {}


def recorded_vae_id(workdir: Path) -> str | None:
    """The VAE fingerprint in the settings record of the run in `workdir`, None where none is recorded (a
    pixel run, no record, or one check_same_run will report as unreadable)."""
    data = recorded_settings(workdir).get("data")
    return data.get("vae") if isinstance(data, dict) else None


INTERRUPTED_BEFORE_ANY_STATE = ("interrupted before any state was saved; rerun the same command to start again (a "
                                "data cache it was building goes on from where it stopped)")


def interruption_message(workdir: Path) -> str:
    """The line printed when Ctrl-C stops a run: where it can be continued from."""
    try:
        step = saved_step(workdir / STATE_FILE)
    except UsageError as err:   # a damaged state: said, not a traceback from inside the handler
        return f"interrupted; {err}"
    if step is None:
        return INTERRUPTED_BEFORE_ANY_STATE
    return (f"interrupted; the last saved state is step {step} in {workdir / STATE_FILE}: rerun the same command "
            f"with --resume to continue it")


def divergence_message(err: Diverged, workdir: Path, lr: float) -> str:
    """The line printed when a run diverges: what was kept, and why --resume would not help."""
    try:
        saved = saved_step(workdir / STATE_FILE)
    except UsageError:   # a state damaged since it was read: not this step's doing, and not to be read now
        saved = None
    kept = ("nothing was saved before it" if saved is None else
            f"nothing of it was saved: the last saved state is step {saved} in {workdir / STATE_FILE}, with its EMA "
            f"in {workdir / EMA_FILE}")
    if err.bad_data:   # not the weights' doing: the same state trains on once the data is whole
        where, fix = err.bad_data
        return f"step {err.step} read data that is not finite ({where}); {kept}. {fix}"
    start_from = "" if saved is None else ", or with --init from the EMA"
    return (f"the run diverged at step {err.step} (loss {err.loss:g}, gradient norm {err.grad_norm:g}); {kept}. "
            f"--resume would diverge again at the same step: start a new run (another --workdir) with a lower "
            f"--lr than {lr:g}{start_from}")
