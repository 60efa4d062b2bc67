"""Where ecar-sample writes a request, batch by batch: one grid image, a folder with one image file per
image, or an ADM-evaluator .npz. Each target knows which batches it already holds, so a rerun of an
interrupted command samples only the others, and the resumable ones (folder, npz) keep a record of the
run's settings (run.json) so that a rerun with other settings is refused instead of mixing images.

The batches are fixed by the batch size alone (see ecar_infer/distributed.py), so any rank of any run
may write any batch; every file is written atomically, so a file that exists is whole.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write_text, make_durable, temporaries_of
from .checks import open_regular, parse_json, read_record, some_of
from .output import join_npz, make_grid, npz_settings, save_image, save_npz

RECORD = "run.json"


class ResumeError(Exception):
    """The target holds images of a run with other settings, or lacks batches it should hold."""


def differing_settings(saved: dict, settings: dict) -> list[str]:
    """The names of the settings whose values in a saved record and in `settings` differ, sorted. Unguided
    (cfg_scale 1 in both), the guidance schedule and interval change no pixel, so they are not compared: a
    rerun that spells them otherwise resumes (records written before this rule included)."""
    now = json.loads(json.dumps(settings))  # tuples -> lists, as saved
    unguided = now.get("cfg_scale") == saved.get("cfg_scale") == 1.0
    ignored = {"cfg_schedule", "cfg_interval"} if unguided else set()
    return sorted(k for k in (now.keys() | saved.keys()) - ignored if now.get(k) != saved.get(k))


# record keys that are no option's name: said with the options that set them
KEY_OPTIONS = {"ckpt_sha256": "the content of --ckpt", "vae_sha256": "the content of --vae",
               "labels_sha256": "the images per class: --class, --per-class"}


def named_settings(keys: list[str]) -> str:
    """'cfg_scale, labels_sha256 (the images per class: --class, --per-class)': differing record keys as a
    refusal names them."""
    return ", ".join(f"{key} ({KEY_OPTIONS[key]})" if key in KEY_OPTIONS else key for key in keys)


def parse_settings(text: str) -> dict:
    """A settings record's text as a dict (a JSON object); ValueError if it is not one."""
    saved = parse_json(text)
    if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    return saved


def read_settings(record: Path) -> dict:
    """A settings record file (a JSON object); OSError or ValueError if it cannot be read."""
    return parse_settings(read_record(record))


def settings_text(settings: dict) -> str:
    return json.dumps(settings, indent=1, sort_keys=True) + "\n"


def write_settings(record: Path, settings: dict) -> None:
    atomic_write_text(record, settings_text(settings))


class Target:
    """A request's images split into batches of `batch_size`, written somewhere."""

    resumable = True

    def __init__(self, labels: Sequence[int], seeds: Sequence[int], batch_size: int) -> None:
        self.labels, self.seeds = list(labels), list(seeds)
        self.batches = [range(i, min(i + batch_size, len(labels))) for i in range(0, len(labels), batch_size)]

    # ---- what a target must say --------------------------------------------------------------------
    def where(self) -> str:
        """The place the batches are written to, for messages."""
        raise NotImplementedError

    def holds(self, batch: int) -> bool:
        raise NotImplementedError

    def write(self, batch: int, images: np.ndarray) -> None:
        """Write the uint8 NHWC images of one batch."""
        raise NotImplementedError

    def finish(self) -> str:
        """After every batch is written: complete the output; returns what was written, for the summary."""
        raise NotImplementedError

    def record_path(self) -> Path:
        raise NotImplementedError

    # ---- resume -----------------------------------------------------------------------------------
    def start(self, settings: dict) -> list[int]:
        """Check the settings record against this run's settings (refusing a mismatch), write it, and
        return the batches still to sample."""
        record = self.record_path()
        if record.exists():
            for stale in self.stale_temporaries():   # before anything is held to count: they hold nothing
                stale.unlink(missing_ok=True)
            differ = differing_settings(self.read_record(), settings)
            if differ and not self.holds_anything():   # stopped before its first batch was saved: nothing to keep
                write_settings(record, settings)
            elif differ:
                raise ResumeError(f"{self.where()} holds images of a run with other settings "
                                  f"({named_settings(differ)}): "
                                  f"rerun that command to finish it, write elsewhere, or delete {self.where()}")
        else:
            self.check_no_foreign_files()
            record.parent.mkdir(parents=True, exist_ok=True)
            write_settings(record, settings)
        return [b for b in range(len(self.batches)) if not self.holds(b)]

    def stale_temporaries(self) -> list[Path]:
        """The temporary files (atomic.py: .NAME.XXXXXXXX.tmp) that writes of this run cut short by a SIGKILL
        left behind; a resume removes them (the one of a join is as large as the whole --npz)."""
        return temporaries_of(self.record_path())

    def holds_anything(self) -> bool:
        """Whether the place holds any file besides the settings record (a run's images, or another's)."""
        folder = self.record_path().parent
        return any(path != self.record_path() for path in folder.iterdir())

    def foreign_files(self) -> list[Path]:
        """Files at the places this request would write, where no run of this command keeps a record: an
        ecar-edit folder, or a user's own files. A resume must not take them for its samples."""
        return []

    def check_no_foreign_files(self) -> None:
        found = self.foreign_files()
        if found:
            raise ResumeError(f"{self.where()} holds files this request would write "
                              f"({some_of([p.name for p in found], 2)}) but no {RECORD} "
                              f"record of an ecar-sample run, so they cannot be resumed: write elsewhere, or move "
                              f"them away")

    def read_record(self) -> dict:
        """The settings saved by the run that wrote the images here; unreadable, they cannot be resumed."""
        record = self.record_path()
        try:
            return read_settings(record)
        except (OSError, ValueError) as err:
            raise ResumeError(f"{self.where()} holds images whose settings record {record.name} cannot be read "
                              f"({err}): write elsewhere, or delete {self.where()}") from None

    def check_complete(self) -> None:
        """Every batch must be there before finishing (they are not when ranks on other machines wrote
        into a folder of the same name that this machine does not see)."""
        missing = [b for b in range(len(self.batches)) if not self.holds(b)]
        if missing:
            raise ResumeError(f"{len(missing)} of {len(self.batches)} batches sampled by the ranks are not in "
                              f"{self.where()} (batch {missing[0]} is one): with several machines, write to a "
                              f"folder that all of them share")

    def saved(self) -> str:
        """What is on disk now, for the line printed when the run is interrupted."""
        done = sum(self.holds(b) for b in range(len(self.batches)))
        return f"{done} of {len(self.batches)} batches are saved in {self.where()}"


class NpzTarget(Target):
    """An ADM-evaluator file: uint8 NHWC `arr_0` with 3 channels and int64 `labels`. Each batch is written
    to FILE.parts/batchNNNNNN.npz; finish() joins them into FILE, with the run's settings record as its
    `settings` entry, and removes the folder. A finished FILE is the record then: the same request again
    has nothing to sample, another is refused rather than replacing it."""

    def __init__(self, path: str | Path, labels: Sequence[int], seeds: Sequence[int], batch_size: int) -> None:
        super().__init__(labels, seeds, batch_size)
        self.path = Path(path)
        self.parts = Path(f"{self.path}.parts")
        self.settings: dict | None = None
        self.finished_before = False

    def start(self, settings: dict) -> list[int]:
        self.settings = settings
        if self.parts.exists() and not self.parts.is_dir():
            raise ResumeError(f"{self.parts} is a file where this run would keep its batches: move it away, or "
                              f"write elsewhere")
        if not self.path.exists() or self.record_path().exists():   # FILE.parts/ with its record: a run to finish
            return super().start(settings)
        self.finished_before = True
        try:
            text = npz_settings(self.path)
            saved = None if text is None else parse_settings(text)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:   # EOFError: an empty file
            raise ResumeError(f"{self.path} exists and is not a sample file ({err}): write elsewhere, or delete "
                              f"it") from None
        if saved is None:
            raise ResumeError(f"{self.path} exists and records no ecar-sample settings: write elsewhere, or delete it")
        differ = differing_settings(saved, settings)
        if differ:
            raise ResumeError(f"{self.path} holds the finished run of other settings ({named_settings(differ)}): write "
                              f"elsewhere, or delete {self.path}")
        shutil.rmtree(self.parts, ignore_errors=True)   # without its record: a finish() cut short while removing it
        return []

    def where(self) -> str:
        return f"{self.parts}/"

    def record_path(self) -> Path:
        return self.parts / RECORD

    def part(self, batch: int) -> Path:
        return self.parts / f"batch{batch:06d}.npz"

    def stale_temporaries(self) -> list[Path]:
        return (super().stale_temporaries() + temporaries_of(self.parts / "batch[0-9]*.npz")
                + temporaries_of(self.path.with_name(glob.escape(self.path.name))))

    def write(self, batch: int, images: np.ndarray) -> None:
        save_npz(images, [self.labels[i] for i in self.batches[batch]], self.part(batch))

    def holds(self, batch: int) -> bool:   # an empty or cut file (a power loss, a copy cut short) is sampled again
        if self.finished_before:
            return True
        try:
            with open_regular(self.part(batch)) as f:   # a FIFO would wait for a writer
                return zipfile.is_zipfile(f)
        except (OSError, ValueError):   # a missing file too
            return False

    def foreign_files(self) -> list[Path]:
        return [path for path in map(self.part, range(len(self.batches))) if path.exists()]

    def finish(self) -> str:
        if self.finished_before:
            return str(self.path)
        self.check_complete()
        try:
            join_npz([self.part(b) for b in range(len(self.batches))], self.labels, self.path,
                     settings_text(self.settings), sizes=[len(batch) for batch in self.batches])
        except ValueError as err:   # a batch file damaged after it was written whole (cut short in a copy)
            raise ResumeError(f"{self.where()} holds a damaged batch file: {err}; delete the damaged file and rerun "
                              f"the same command, which samples its batch again") from None
        make_durable(self.path)   # on disk before the batches go: a power loss must not take the run with both
        self.record_path().unlink()   # first: FILE.parts/ without its record is taken for what is left to remove
        shutil.rmtree(self.parts)
        return str(self.path)


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"   # the IEND chunk: length 0, type, CRC; every PNG ends so


def png_is_whole(path: Path) -> bool:
    """Whether `path` is a PNG file that reaches its end chunk (cheap: its first and last bytes only)."""
    try:
        with open_regular(path) as f:   # a FIFO would wait for a writer
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            f.seek(0, os.SEEK_END)
            if f.tell() < 8 + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except (OSError, ValueError):
        return False


class FolderTarget(Target):
    """One PNG per image, DIR/class003_seed000017.png, and the settings record DIR/run.json (kept)."""

    def __init__(self, folder: str | Path, labels: Sequence[int], seeds: Sequence[int], batch_size: int) -> None:
        super().__init__(labels, seeds, batch_size)
        self.folder = Path(folder)

    def where(self) -> str:
        return f"{self.folder}/"

    def record_path(self) -> Path:
        return self.folder / RECORD

    def stale_temporaries(self) -> list[Path]:
        return super().stale_temporaries() + temporaries_of(self.folder / "class[0-9]*_seed[0-9]*.png")

    def image_path(self, index: int) -> Path:
        return self.folder / f"class{self.labels[index]:03d}_seed{self.seeds[index]:06d}.png"

    def holds(self, batch: int) -> bool:   # an empty or cut file is what a power loss or a copy cut short leaves
        return all(png_is_whole(self.image_path(i)) for i in self.batches[batch])

    def foreign_files(self) -> list[Path]:
        return [path for path in map(self.image_path, range(len(self.labels))) if path.exists()]

    def write(self, batch: int, images: np.ndarray) -> None:
        for i, image in zip(self.batches[batch], images):
            save_image(image, self.image_path(i))

    def finish(self) -> str:
        self.check_complete()
        return f"{len(self.labels)} PNG files in {self.where()}"


class GridTarget(Target):
    """All images in one grid image (PNG, JPEG or WebP after the extension), written at the end; nothing
    is saved before that, so it does not resume."""

    resumable = False

    def __init__(self, path: str | Path, labels: Sequence[int], seeds: Sequence[int], batch_size: int,
                 columns: int | None, row_names: Sequence[str] | None = None) -> None:
        super().__init__(labels, seeds, batch_size)
        self.path, self.columns = Path(path), columns
        self.row_names = row_names   # class names: label each row of the grid with its classes
        self.images: dict[int, np.ndarray] = {}

    def where(self) -> str:
        return str(self.path)

    def start(self, settings: dict) -> list[int]:
        return list(range(len(self.batches)))

    def holds(self, batch: int) -> bool:
        return batch in self.images

    def write(self, batch: int, images: np.ndarray) -> None:
        self.images[batch] = images

    def finish(self) -> str:
        images = np.concatenate([self.images[b] for b in range(len(self.batches))])
        grid = make_grid(images, columns=self.columns)
        if self.row_names is not None:
            from .class_names import label_rows

            per_row = self.columns or int(np.ceil(np.sqrt(len(self.labels))))   # make_grid's layout
            rows = [self.labels[i:i + per_row] for i in range(0, len(self.labels), per_row)]
            grid = label_rows(grid, [", ".join(self.row_names[y] for y in dict.fromkeys(row)) for row in rows],
                              images.shape[1])
        save_image(grid, self.path)
        return f"{self.path} (a grid of {len(self.labels)})"

    def saved(self) -> str:
        return "nothing was written"
