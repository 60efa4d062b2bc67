"""Atomic writes (ecar_infer/atomic.py) and the writers built on them: a write that fails midway leaves
no file at the target (and no temporary file), and outputs get the mode the umask gives a normal file."""
import os
import stat

import numpy as np
import pytest

from conftest import random_model
from ecar_infer import ECARConfig, save_checkpoint
from ecar_infer.atomic import atomic_path, atomic_write_text
from ecar_infer.output import join_npz, save_image, save_npz


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_write_failing_midway_leaves_no_file(tmp_path, error):
    target = tmp_path / "out.bin"
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of it")
            raise error
    assert names(tmp_path) == []


def test_a_write_failing_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise OSError("disk full")
    assert target.read_text() == "old" and names(tmp_path) == ["out.txt"]


def test_the_temporary_file_is_beside_the_target(tmp_path):
    """A rename is atomic only within one file system: the temporary file must be in the target's folder
    (not in the system's temporary folder, which may be another file system), and is gone afterwards."""
    target = tmp_path / "sub" / "out.txt"
    target.parent.mkdir()
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and tmp != target
        tmp.write_text("whole")
    assert names(target.parent) == ["out.txt"] and target.read_text() == "whole"


@pytest.mark.parametrize("images", [1, 3])
def test_an_npz_whose_images_and_labels_differ_in_number_is_refused(tmp_path, images):
    """Every image has its label: a sample file with fewer (or more) images than labels is an error, and none
    is written; the same for a join of parts."""
    with pytest.raises(ValueError, match=f"{images} images for 2 labels"):
        save_npz(np.zeros((images, 4, 4, 3), np.uint8), [0, 1], tmp_path / "s.npz")
    assert names(tmp_path) == []
    save_npz(np.zeros((1, 4, 4, 3), np.uint8), [0], tmp_path / "part.npz")
    with pytest.raises(ValueError, match=f"{images} images for 2 labels"):
        join_npz([tmp_path / "part.npz"] * images, [0, 1], tmp_path / "all.npz")
    assert names(tmp_path) == ["part.npz"]


def fail_after_some_bytes(monkeypatch, cls, method):
    """Make cls.method write a few bytes to its file argument, then fail, as a full disk would."""
    def broken(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(cls, method, broken)


@pytest.mark.parametrize("name", ["x.png", "x.jpg", "x.webp"])
def test_an_image_write_failing_midway_leaves_no_file(tmp_path, monkeypatch, name):
    from PIL import Image

    fail_after_some_bytes(monkeypatch, Image.Image, "save")
    with pytest.raises(OSError):
        save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / name)
    assert names(tmp_path) == []


def test_an_npz_join_failing_midway_leaves_no_file(tmp_path):
    save_npz(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], tmp_path / "part0.npz")
    with pytest.raises(FileNotFoundError):  # the second part is missing: the join stops half way
        join_npz([tmp_path / "part0.npz", tmp_path / "part1.npz"], [0, 1, 2, 3], tmp_path / "all.npz")
    assert names(tmp_path) == ["part0.npz"]


def test_a_checkpoint_write_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    import ecar_infer.checkpoint

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError("No space left on device")

    monkeypatch.setattr(ecar_infer.checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(random_model(ECARConfig.preset("ecar-tiny")), tmp_path / "m.safetensors")
    assert names(tmp_path) == []


def test_outputs_get_the_umask_mode_of_a_normal_file(tmp_path, umask_022):
    save_image(np.zeros((4, 4, 1), np.uint8), tmp_path / "a.png")
    save_npz(np.zeros((1, 4, 4, 1), np.uint8), [0], tmp_path / "a.npz")
    atomic_write_text(tmp_path / "a.json", "{}")
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny")), tmp_path / "m.safetensors")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.png", "a.npz", "a.json", "m.safetensors"], 0o644)
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.json", "{}")
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_benchmark_reports_are_written_through_the_helper(tmp_path, monkeypatch, umask_022):
    """Outputs of other parts of the project (here the benchmark report) use the same helper."""
    import ecar_infer.atomic
    from benchmarks.report import write_outputs

    written, real = [], ecar_infer.atomic.create_temporary
    monkeypatch.setattr(ecar_infer.atomic, "create_temporary", lambda path: written.append(path.name) or real(path))
    write_outputs({"a": 1}, "| a |", str(tmp_path / "r.json"), str(tmp_path / "r.md"))
    assert written == ["r.json", "r.md"] and names(tmp_path) == ["r.json", "r.md"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}


def test_make_durable_syncs_the_file_and_tolerates_a_folder_that_refuses(tmp_path, monkeypatch):
    """Some file systems refuse to fsync a folder (EINVAL): the --npz join must not fail on every rerun for it.
    A file that cannot be synced is an error still."""
    import errno

    from ecar_infer.atomic import make_durable

    path = tmp_path / "f.npz"
    path.write_bytes(b"x")
    synced, real = [], os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    make_durable(path)
    assert len(synced) == 1
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        make_durable(path)


def test_an_interrupt_right_after_the_temporary_file_is_made_leaves_none(tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C can land between creating the temporary file and the block: it must go too."""
    from pathlib import Path

    real_stat, calls = Path.stat, []

    def stat_once_interrupted(self, *args, **kwargs):
        if self.name.endswith(".tmp") and not calls:
            calls.append(self)
            raise KeyboardInterrupt
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat_once_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("never")
    monkeypatch.undo()
    assert calls and list(tmp_path.iterdir()) == []
