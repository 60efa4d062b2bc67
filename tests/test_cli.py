import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ecar_infer.weights
from conftest import random_model, refuse_writes_in
from ecar_infer import ECARConfig, Sampler, save_checkpoint
from ecar_infer.cli import build_parser, main

TINY = ECARConfig.preset("ecar-tiny")  # pixel space, 16 px, 1 channel, 10 classes, 3 stages



def run(capsys, *args):
    """main() in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_default_output_is_a_png_grid_with_a_row_per_class(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "0-2", "--n", "2", "--steps", "2", "--out", out)
    assert code == 0, stderr
    assert Image.open(out).size == (2 * 18 - 2, 3 * 18 - 2)  # 2 columns, 3 rows of 16 px with 2 px gaps
    assert "sampled 6 images" in stdout and "images/s" in stdout and str(out) in stdout
    assert "sampling" in stderr  # the progress bar is on by default
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name, fmt", [("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"), ("grid.webp", "WEBP")])
def test_the_grid_is_written_in_the_format_its_extension_names(ckpt, tmp_path, capsys, name, fmt):
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1,2", "--steps", "1", "--out", tmp_path / name, "-q")
    assert code == 0, stderr
    assert Image.open(tmp_path / name).format == fmt and leftovers(tmp_path) == []


def test_outdir_names_each_image_by_class_and_seed(ckpt, tmp_path, capsys):
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "3", "--class", "7", "--n", "2", "--seed", "17",
                          "--steps", "2", "--outdir", tmp_path / "out", "--no-progress")
    assert code == 0 and stderr == ""
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["class003_seed000017.png", "class003_seed000018.png", "class007_seed000019.png",
                     "class007_seed000020.png", "run.json"]  # run.json: the settings record
    # the file named with class 7 and seed 20 is what that seed gives alone
    alone = Sampler.from_pretrained(ckpt, device="cpu", progress=False).generate([7], seed=20, steps_per_stage=2,
                                                                                  output_type="np")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / names[3])), alone.images[0, ..., 0])


def test_outdir_resumes_an_interrupted_run(ckpt, tmp_path, capsys):
    args = ("--ckpt", ckpt, "--class", "2", "--per-class", "3", "--steps", "2", "--outdir", tmp_path / "out",
            "--batch-size", "2", "--no-progress")
    assert run(capsys, *args)[0] == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    before = {p.name: p.read_bytes() for p in files}
    files[2].unlink()  # as if the run had stopped before writing the second batch
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and "1 of 2 batches are already in" in stderr and "sampled 1 image in" in stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")} == before


def test_outdir_resamples_a_batch_with_only_some_of_its_images(ckpt, tmp_path, capsys):
    """A batch counts as saved only when every one of its images is there (its images are written one by one)."""
    args = ("--ckpt", ckpt, "--class", "2", "--per-class", "3", "--steps", "2", "--outdir", tmp_path / "out",
            "--batch-size", "2", "--no-progress")
    assert run(capsys, *args)[0] == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    before = {p.name: p.read_bytes() for p in files}
    files[1].unlink()  # the second image of the first batch (of two) is missing, the first is there
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and "1 of 2 batches are already in" in stderr and "sampled 2 images" in stdout, stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")} == before


def test_npz_is_an_adm_evaluator_file(ckpt, tmp_path, capsys):
    path = tmp_path / "samples.npz"
    # underscore spellings are accepted too
    code, _, _ = run(capsys, "--ckpt", ckpt, "--class", "1,4", "--per_class", "3", "--steps", "2", "--batch_size",
                     "4", "--cfg_scale=1.5", "--npz", path, "-q")
    assert code == 0
    with np.load(path) as data:
        assert sorted(data.keys()) == ["arr_0", "labels", "settings"]  # the run's settings record, as text
        assert json.loads(str(data["settings"]))["cfg_scale"] == 1.5
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 16, 16, 3)
        assert np.array_equal(data["arr_0"][..., 0], data["arr_0"][..., 2])  # the gray channel, replicated
        assert data["labels"].tolist() == [1, 1, 1, 4, 4, 4]
    assert leftovers(tmp_path) == []


def interrupt_generate(monkeypatch, at_call: int):
    """Make Sampler.generate raise KeyboardInterrupt on its at_call-th call, as if the user pressed ^C."""
    real_generate, calls = Sampler.generate, []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "generate", generate)


def run_interrupted(capsys, monkeypatch, at_call, *args):
    """main() with ^C pressed during the at_call-th batch: (exit status, stderr)."""
    with monkeypatch.context() as patch:
        interrupt_generate(patch, at_call)
        code, _, stderr = run(capsys, *args)
    return code, stderr


def test_npz_resumes_an_interrupted_run_from_its_saved_batches(ckpt, tmp_path, capsys, monkeypatch):
    path = tmp_path / "samples.npz"
    args = ("--ckpt", ckpt, "--class", "0-2", "--n", "2", "--steps", "2", "--batch-size", "4", "--npz", path,
            "--no-progress")
    assert run(capsys, *args)[0] == 0
    whole = path.read_bytes()
    path.unlink()
    code, stderr = run_interrupted(capsys, monkeypatch, 2, *args)  # the second batch never finishes
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip() == (f"ecar-sample: interrupted: 1 of 2 batches are saved in {path}.parts/; rerun the "
                              f"same command to resume")
    assert not path.exists()
    assert sorted(p.name for p in (tmp_path / "samples.npz.parts").iterdir()) == ["batch000000.npz", "run.json"]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and "1 of 2 batches are already in" in stderr and "sampled 2 images" in stdout
    assert path.read_bytes() == whole  # byte for byte what the uninterrupted run wrote
    with np.load(path) as data:
        assert data["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # the parts folder is gone


def test_a_finished_npz_is_not_sampled_again_nor_replaced_by_another_request(ckpt, tmp_path, capsys, monkeypatch):
    path = tmp_path / "samples.npz"
    args = ("--ckpt", ckpt, "--class", "0-2", "--n", "2", "--steps", "2", "--batch-size", "4", "--npz", path)
    assert run(capsys, *args)[0] == 0
    whole = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("nothing should be sampled"))
        code, stdout, stderr = run(capsys, *args)
        assert code == 0 and stderr == "", stderr
        assert stdout == f"nothing to sample: the 6 images of this request are already written ({path})\n"
        code, stdout, stderr = run(capsys, *args, "--cfg-scale", "2.5", "--seed", "3")
        assert code == 2 and stdout == ""
        assert stderr == (f"ecar-sample: error: {path} holds the finished run of other settings (cfg_scale, seed): "
                          f"write elsewhere, or delete {path}\n")
        assert path.read_bytes() == whole and sorted(tmp_path.iterdir()) == [path]
        for other, why in ((lambda: np.savez(path, arr_0=np.zeros((1, 2, 2, 3), np.uint8)),
                            "records no ecar-sample settings"),
                           (lambda: path.write_text("not an npz"), "is not a sample file"),
                           (lambda: path.write_bytes(b""), "is not a sample file"),   # was an EOFError traceback
                           (lambda: path.write_bytes(whole[:300]), "is not a sample file"),
                           # a settings entry declaring 10**10 strings: allocated before it was read
                           (lambda: npz_of_headers(path, arr_0=((1, 2, 2, 3), np.uint8), settings=((10**10,), "<U1")),
                            r"is not a sample file \(`settings` describes <U1 \[10000000000\] \(40,000,000,128 "
                            r"bytes\) but holds 128 bytes\)")):
            other()
            code, stdout, stderr = run(capsys, *args)
            assert code == 2, stderr
            assert re.match(f"ecar-sample: error: {re.escape(str(path))} exists and {why}", stderr), stderr
            assert stderr.endswith(": write elsewhere, or delete it\n") and sorted(tmp_path.iterdir()) == [path]
    path.unlink()
    assert run(capsys, *args)[0] == 0 and path.read_bytes() == whole


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="names the synced files through /proc (Linux)")
def test_the_joined_npz_is_on_disk_before_its_batch_files_are_removed(ckpt, tmp_path, capsys, monkeypatch):
    """Without an fsync, a power loss just after the join could leave an empty FILE (delayed allocation) with
    the batch files already gone: the whole run lost. FILE and its folder are synced first."""
    import os
    import shutil

    from ecar_infer import targets

    events, real_fsync, real_rmtree = [], os.fsync, shutil.rmtree
    path = tmp_path / "s.npz"
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(targets.shutil, "rmtree", lambda p, *a, **k: events.append(("rmtree", str(p)))
                        or real_rmtree(p, *a, **k))
    assert run(capsys, "--ckpt", ckpt, "--class", "1-2", "--steps", "1", "--batch-size", "1", "--npz", path, "-q")[0] == 0
    assert events == [("fsync", str(path)), ("fsync", str(tmp_path)), ("rmtree", f"{path}.parts")]


def test_a_finish_interrupted_while_removing_the_parts_is_finished(ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the joined file's FILE.parts/ was being removed, its run.json already gone: the rerun
    refused the finished file ("holds files ... but no run.json"). It is finished; the rest of the folder goes."""
    path = tmp_path / "s.npz"
    args = ("--ckpt", ckpt, "--class", "2", "--per-class", "2", "--steps", "1", "--batch-size", "1", "--npz", path)
    assert run(capsys, *args)[0] == 0
    whole = path.read_bytes()
    (tmp_path / "s.npz.parts").mkdir()
    np.savez(tmp_path / "s.npz.parts" / "batch000001.npz", arr_0=np.zeros((1, 16, 16, 3), np.uint8))
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("nothing should be sampled"))
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and stderr == "" and stdout.startswith("nothing to sample"), stderr
    assert path.read_bytes() == whole and sorted(tmp_path.iterdir()) == [path]


def test_a_file_where_the_parts_folder_goes_is_a_user_error(ckpt, tmp_path, capsys):
    path = tmp_path / "s.npz"
    (tmp_path / "s.npz.parts").write_text("mine")
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "2", "--steps", "1", "--npz", path)
    assert code == 2 and stderr == (f"ecar-sample: error: {path}.parts is a file where this run would keep its "
                                    f"batches: move it away, or write elsewhere\n"), stderr
    assert (tmp_path / "s.npz.parts").read_text() == "mine"


@pytest.mark.parametrize("damage", [lambda whole: b"", lambda whole: whole[:100], lambda whole: whole[:-1],
                                    lambda whole: bytes(8) + whole[8:]],
                         ids=["empty", "cut short", "its last byte lost", "its signature zeroed"])
def test_an_empty_or_cut_png_in_an_outdir_is_sampled_again(ckpt, tmp_path, capsys, damage):
    """A power loss or a copy cut short can leave an empty or cut file: its batch counted as written (a cut one
    still does not: only a whole PNG does)."""
    args = ("--ckpt", ckpt, "--class", "2", "--per-class", "3", "--steps", "1", "--batch-size", "1", "--outdir",
            tmp_path / "out")
    assert run(capsys, *args)[0] == 0
    pngs = sorted((tmp_path / "out").glob("*.png"))
    whole = pngs[1].read_bytes()
    pngs[1].write_bytes(damage(whole))
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and pngs[1].read_bytes() == whole, stderr


def test_a_fifo_where_a_png_goes_is_not_a_written_image(tmp_path):
    """Reading it to see whether it is a whole PNG waited for a writer, forever; it is no image."""
    from ecar_infer.targets import png_is_whole

    os.mkfifo(tmp_path / "class001_seed000000.png")
    assert not png_is_whole(tmp_path / "class001_seed000000.png")


def test_a_finished_outdir_says_there_is_nothing_to_sample(ckpt, tmp_path, capsys, monkeypatch):
    args = ("--ckpt", ckpt, "--class", "2", "--per-class", "3", "--steps", "2", "--outdir", tmp_path / "out")
    assert run(capsys, *args)[0] == 0
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("nothing should be sampled"))
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and stderr == ""
    assert stdout == (f"nothing to sample: the 3 images of this request are already written (3 PNG files in "
                      f"{tmp_path / 'out'}/)\n")


def test_files_without_a_record_are_not_resumed(ckpt, tmp_path, capsys, monkeypatch):
    """Images at the names a request would write, with no run.json (an ecar-edit folder, a user's own files),
    or an --npz's parts without one, are not taken for this request's samples: refused, left as they were."""
    from ecar_infer.edit_cli import main as edit_main

    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    assert edit_main([str(a) for a in ("--ckpt", ckpt, "--image", image, "--mask", "left", "--class", "0", "--n", "3",
                                       "--steps", "1", "--outdir", tmp_path / "edits", "-q")]) == 0
    (tmp_path / "s.npz.parts").mkdir()
    np.savez(tmp_path / "s.npz.parts" / "batch000000.npz", arr_0=np.zeros((3, 16, 16, 1), np.uint8))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("nothing should be sampled"))
    for option, where, names in (("--outdir", tmp_path / "edits", "class000_seed000000.png, class000_seed000001.png "
                                                                  "and 1 more"),
                                 ("--npz", tmp_path / "s.npz", "batch000000.npz")):
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "0", "--n", "3", "--steps", "1", option, where)
        shown = f"{where}/" if option == "--outdir" else f"{where}.parts/"
        assert code == 2 and stderr == (f"ecar-sample: error: {shown} holds files this request would write ({names}) "
                                        f"but no run.json record of an ecar-sample run, so they cannot be resumed: "
                                        f"write elsewhere, or move them away\n"), stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_only_rank_0_reports_an_interrupt(ckpt, tmp_path, capsys, monkeypatch):
    """Under torchrun ^C reaches every rank; one line, from rank 0, says what was written (the rank is read
    from torchrun's RANK, so a plain process with RANK=1 stands in for a second rank here)."""
    args = ("--ckpt", ckpt, "--class", "1", "--n", "2", "--steps", "1", "--npz", tmp_path / "s.npz", "--no-progress")
    monkeypatch.setenv("RANK", "1")
    assert run_interrupted(capsys, monkeypatch, 1, *args) == (130, "")
    monkeypatch.setenv("RANK", "0")
    code, stderr = run_interrupted(capsys, monkeypatch, 1, *args)
    assert code == 130 and stderr.startswith("ecar-sample: interrupted: ") and len(stderr.splitlines()) == 1


def test_npz_parts_are_joined_in_batch_order_whatever_order_they_were_written(tmp_path):
    """Ranks finish their batches in any order, and a resumed run writes early batches last; more than ten
    batches, so that neither the order of writing nor a text sort of the part names is the batch order."""
    from ecar_infer.targets import NpzTarget

    labels = [k % 10 for k in range(12)]
    target = NpzTarget(tmp_path / "s.npz", labels, list(range(12)), batch_size=1)
    assert target.start({"any": "settings"}) == list(range(12))
    for b in [11, 2, 10, 0, 1, 5, 4, 3, 9, 8, 7, 6]:
        target.write(b, np.full((1, 2, 2, 1), b, np.uint8))
    target.finish()
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"][:, 0, 0, 0].tolist() == list(range(12)) and data["labels"].tolist() == labels


def test_an_unfinished_npz_run_resumes_even_with_a_file_at_its_path(tmp_path):
    """FILE.parts/ is a run to finish: a file already at FILE (an older version's, which records no
    settings) does not stop it, and the finished run replaces it."""
    from ecar_infer.targets import NpzTarget

    path, labels, settings = tmp_path / "s.npz", [3, 4], {"any": "settings"}
    first = NpzTarget(path, labels, [0, 1], batch_size=1)
    assert first.start(settings) == [0, 1]
    first.write(0, np.full((1, 2, 2, 3), 7, np.uint8))   # then interrupted
    np.savez(path, arr_0=np.zeros((1, 2, 2, 3), np.uint8), labels=np.zeros(1, np.int64))
    again = NpzTarget(path, labels, [0, 1], batch_size=1)
    assert again.start(settings) == [1]
    again.write(1, np.full((1, 2, 2, 3), 8, np.uint8))
    again.finish()
    with np.load(path) as data:
        assert data["arr_0"][:, 0, 0, 0].tolist() == [7, 8] and data["labels"].tolist() == labels
    assert not (tmp_path / "s.npz.parts").exists()


class MakesAFolderWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_finished_npz_whose_settings_are_pickled_is_refused_without_unpickling_them(tmp_path):
    """An .npz at the --npz path is read as untrusted: a pickled settings entry could run code when loaded."""
    from ecar_infer.targets import NpzTarget, ResumeError

    path, marker = tmp_path / "s.npz", tmp_path / "unpickled"
    np.savez(path, arr_0=np.zeros((1, 2, 2, 3), np.uint8), labels=np.zeros(1, np.int64),
             settings=np.array([MakesAFolderWhenUnpickled(marker)], dtype=object))
    with pytest.raises(ResumeError, match=f"{path} exists and is not a sample file"):
        NpzTarget(path, [0], [0], batch_size=1).start({"any": "settings"})
    assert not marker.exists()


def test_batches_missing_at_the_end_are_a_user_error_and_the_parts_stay(ckpt, tmp_path, capsys, monkeypatch):
    """A batch sampled by a rank but not in the folder rank 0 sees (ranks on machines that do not share the
    output folder): one line, status 2, and the saved parts are kept."""
    from ecar_infer.targets import NpzTarget

    path = tmp_path / "s.npz"
    real_write = NpzTarget.write
    monkeypatch.setattr(NpzTarget, "write", lambda self, b, images: b == 1 or real_write(self, b, images))
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "1-3", "--steps", "1", "--batch-size", "1",
                               "--npz", path, "-q")
    assert code == 2 and stdout == "" and "Traceback" not in stderr, stderr
    assert stderr.strip() == (f"ecar-sample: error: 1 of 3 batches sampled by the ranks are not in {path}.parts/ "
                              f"(batch 1 is one): with several machines, write to a folder that all of them share")
    assert not path.exists()
    assert sorted(p.name for p in (tmp_path / "s.npz.parts").iterdir()) == ["batch000000.npz", "batch000002.npz",
                                                                            "run.json"]


def npz_of_headers(path, **members):
    """An .npz whose members are .npy headers of the (shape, dtype) given, and no data: what a crafted or damaged
    file can declare."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, (shape, dtype) in members.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": shape})
            archive.writestr(name + ".npy", header.getvalue())


@pytest.mark.parametrize("damage, why", [
    (lambda part: np.savez(part, arr_0=np.array([None], dtype=object)), r"batch000000.npz cannot be read \(Object arrays"),
    # a header declaring 10**10 images: numpy allocated them before anything was compared (a MemoryError)
    (lambda part: npz_of_headers(part, arr_0=((10**10, 16, 16, 3), np.uint8)),
     r"batch000000.npz cannot be read \(`arr_0` describes uint8 \[10000000000, 16, 16, 3\] \(7,680,000,000,128 "
     r"bytes\) but holds 128 bytes\)"),
    # one image of 10**6 x 10**6 pixels: its count was right, and numpy allocated it
    (lambda part: npz_of_headers(part, arr_0=((1, 10**6, 10**6, 3), np.uint8)),
     r"batch000000.npz cannot be read \(`arr_0` describes uint8 \[1, 1000000, 1000000, 3\]"),
    (lambda part: np.savez(part, arr_0=np.zeros((1, 8, 16, 3), np.uint8)),
     r"batch000001.npz holds images of uint8 \(16, 16, 3\) where batch000000.npz holds uint8 \(8, 16, 3\)"),
    (lambda part: np.savez(part, arr_0=np.zeros((3, 16, 16, 3), np.uint8)), r"batch000000.npz holds 3 images, not 1"),
], ids=["pickled", "a header of 10**10 images", "a header of one huge image", "another size", "another number"])
def test_a_damaged_batch_file_is_a_user_error_and_the_parts_stay(ckpt, tmp_path, capsys, monkeypatch, damage, why):
    """A batch file in FILE.parts/ damaged after it was written (a copy cut short) failed the join at the end
    with a BadZipFile or ValueError traceback: one line now, naming the file (for a batch of another image size, that
    file and the first: the user knows which size the model makes)."""
    path = tmp_path / "s.npz"
    args = ("--ckpt", ckpt, "--class", "1-2", "--steps", "1", "--batch-size", "1", "--npz", path, "-q")
    assert run_interrupted(capsys, monkeypatch, 2, *args)[0] == 130
    damage(tmp_path / "s.npz.parts" / "batch000000.npz")
    code, stdout, stderr = run(capsys, *args)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert re.fullmatch(f"ecar-sample: error: {re.escape(str(path))}.parts/ holds a damaged batch file: {why}.*; delete "
                        f"the damaged file and rerun the same command, which samples its batch again\n", stderr), stderr
    assert not path.exists() and (tmp_path / "s.npz.parts" / "batch000001.npz").exists()


@pytest.mark.parametrize("damage", [lambda part: part.write_bytes(b""), lambda part: part.write_bytes(part.read_bytes()[:100])],
                         ids=["empty", "cut short"])
def test_an_empty_or_cut_batch_file_is_sampled_again(ckpt, tmp_path, capsys, monkeypatch, damage):
    """What a power loss or a copy cut short leaves of a batch file: it counted as saved, the rest of the run was
    sampled, and the join at the end failed. It is sampled again now, and the file is what an uninterrupted run
    writes."""
    path = tmp_path / "s.npz"
    args = ("--ckpt", ckpt, "--class", "1-2", "--steps", "1", "--batch-size", "1", "--npz", path, "-q")
    assert run(capsys, *args)[0] == 0
    whole = path.read_bytes()
    path.unlink()
    assert run_interrupted(capsys, monkeypatch, 2, *args)[0] == 130
    damage(tmp_path / "s.npz.parts" / "batch000000.npz")
    code, _, stderr = run(capsys, *args)
    assert code == 0 and "batches are already in" not in stderr, stderr
    assert path.read_bytes() == whole


@pytest.mark.parametrize("output", ["npz", "outdir"])
def test_a_resume_removes_the_temporary_files_a_killed_run_left(ckpt, tmp_path, capsys, monkeypatch, output):
    """A SIGKILL cuts a write short before its rename: the temporary file (.NAME.XXXXXXXX.tmp) stayed for good,
    and the join's is as large as the whole --npz. A resume removes this run's; a user's own hidden file stays,
    and a record beside nothing else still takes corrected settings."""
    out = ["--npz", str(tmp_path / "s.npz")] if output == "npz" else ["--outdir", str(tmp_path / "out")]
    args = ("--ckpt", ckpt, "--class", "1-2", "--steps", "1", "--batch-size", "1", *out, "-q")
    assert run_interrupted(capsys, monkeypatch, 1, *args)[0] == 130
    folder = tmp_path / ("s.npz.parts" if output == "npz" else "out")
    stale = [folder / ".run.json.0123abcd.tmp"] + (
        [folder / ".batch000000.npz.89abcdef.tmp", tmp_path / ".s.npz.deadbeef.tmp"] if output == "npz"
        else [folder / ".class001_seed000000.png.89abcdef.tmp"])
    for path in stale:
        path.write_bytes(b"cut short")
    (tmp_path / ".notes.tmp").write_text("mine")
    assert run(capsys, *args, "--cfg-scale", "3")[0] == 0   # other settings: nothing but the record was held
    assert not any(path.exists() for path in stale) and (tmp_path / ".notes.tmp").read_text() == "mine"


def test_a_run_stopped_before_its_first_batch_takes_corrected_settings(ckpt, tmp_path, capsys, monkeypatch):
    """Stopped before any batch was saved, a run leaves only its settings record; the corrected command was
    refused for settings that held no image, and the way out offered was deleting the folder. Now the record is
    replaced. A record beside saved batches still refuses other settings."""
    path = tmp_path / "s.npz"
    args = ("--ckpt", ckpt, "--class", "1-2", "--steps", "1", "--batch-size", "1", "--npz", path, "-q")
    assert run_interrupted(capsys, monkeypatch, 1, *args)[0] == 130
    assert sorted(p.name for p in (tmp_path / "s.npz.parts").iterdir()) == ["run.json"]
    assert run_interrupted(capsys, monkeypatch, 2, *args, "--cfg-scale", "3")[0] == 130   # the checkpoint recommends 2
    assert json.loads((tmp_path / "s.npz.parts" / "run.json").read_text())["cfg_scale"] == 3.0   # the new record
    assert run(capsys, *args, "--cfg-scale", "3")[0] == 0 and path.exists()
    path.unlink()
    assert run_interrupted(capsys, monkeypatch, 2, *args)[0] == 130
    code, _, stderr = run(capsys, *args, "--cfg-scale", "2.5")
    assert code == 2 and "holds images of a run with other settings (cfg_scale)" in stderr


@pytest.mark.parametrize("output, saved", [
    ("--outdir {tmp}/out", "0 of 2 batches are saved in {tmp}/out/; rerun the same command to resume"),
    ("--out {tmp}/grid.png", "nothing was written"),
])
def test_ctrl_c_prints_one_line_and_exits_130(ckpt, tmp_path, capsys, monkeypatch, output, saved):
    args = ["--ckpt", ckpt, "--class", "1", "--n", "3", "--steps", "2", "--batch-size", "2", "-q",
            *output.format(tmp=tmp_path).split()]
    code, stderr = run_interrupted(capsys, monkeypatch, 1, *args)
    assert code == 130 and stderr.strip() == f"ecar-sample: interrupted: {saved.format(tmp=tmp_path)}"


def test_ctrl_c_while_the_model_loads_is_one_line_too(ckpt, capsys, monkeypatch):
    """^C during start-up (torch half imported): the error types must not be imported to match it, since
    importing inside an interrupted import fails (an ImportError traceback, status 1, before this fix)."""
    from ecar_infer import cli

    def interrupted_import(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_sampler", interrupted_import)
    monkeypatch.setattr(cli, "user_errors", lambda: pytest.fail("user_errors() imported during an interrupt"))
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "1")
    assert code == 130 and stdout == "" and stderr == "ecar-sample: interrupted: nothing was written\n"


# ---- a rerun with other settings is refused, for every field of the settings record -------------------
@pytest.fixture(scope="module")
def ckpt_copy(ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("copy") / "tiny-copy.safetensors"
    shutil.copy(ckpt, path)
    return path


@pytest.fixture(scope="module")
def ckpt_other(ckpt, tmp_path_factory):
    """Other weights with the same config and metadata as ckpt."""
    path = tmp_path_factory.mktemp("other") / "tiny-other.safetensors"
    save_checkpoint(random_model(TINY, seed=9), path, extra_metadata={"recommended_cfg": "2.0"})
    return path


def random_vae_file(folder, seed=0):
    from ecar_infer.vae import save_autoencoder, sd_vae_random

    path = folder / f"vae{seed}.safetensors"
    save_autoencoder(sd_vae_random(seed, config=ECARConfig.preset("ecar-tiny-vae")), path)
    return path


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return random_vae_file(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def vae_other(tmp_path_factory):
    return random_vae_file(tmp_path_factory.mktemp("vae"), seed=1)


INDEX = "tiny.safetensors.index.json"


def sharded_checkpoint(folder, seed):
    save_checkpoint(random_model(TINY, seed=seed), folder / INDEX, extra_metadata={"recommended_cfg": "2.0"},
                    max_shard_bytes=20_000)
    return folder


@pytest.fixture(scope="module")
def ckpt_sharded(tmp_path_factory):
    """A folder with a sharded checkpoint: its index and the shards it names."""
    return sharded_checkpoint(tmp_path_factory.mktemp("sharded"), seed=2)


@pytest.fixture(scope="module")
def ckpt_sharded_other(ckpt_sharded, tmp_path_factory):
    """Other weights in shards of the same names under the same index: only the shards' contents differ."""
    folder = sharded_checkpoint(tmp_path_factory.mktemp("sharded-other"), seed=9)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in ckpt_sharded.iterdir())
    assert len(list(folder.iterdir())) > 2 and (folder / INDEX).read_bytes() == (ckpt_sharded / INDEX).read_bytes()
    return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A diffusers VAE folder, as save_pretrained writes it: config.json beside the weights."""
    from ecar_infer.vae import sd_vae_random

    folder = tmp_path_factory.mktemp("vae-folder") / "vae"
    sd_vae_random(0, config=ECARConfig.preset("ecar-tiny-vae")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_folder_other(vae_folder, tmp_path_factory):
    """The same weights with another scaling factor in config.json: only the file beside the weights differs."""
    folder = tmp_path_factory.mktemp("vae-folder-other") / "vae"
    shutil.copytree(vae_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 2 * config["scaling_factor"]}))
    return folder


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TINY_VAE = "--random-init ecar-tiny-vae"
# settings field -> (the first run's arguments, the rerun's[, a file, or a folder's files, replaced by other
# content of the same kind before the rerun]); each case differs in that field
FIELD_CHANGES = {
    "ckpt_sha256": ("--ckpt {tmp}/model.safetensors", "--ckpt {tmp}/model.safetensors", "model.safetensors"),
    "vae_sha256": (TINY_VAE + " --vae {tmp}/vae.safetensors", TINY_VAE + " --vae {tmp}/vae.safetensors",
                   "vae.safetensors"),
    "random_init": ("--ckpt {ckpt}", "--random-init ecar-tiny"),
    "vae_slicing": (TINY_VAE, TINY_VAE + " --vae-slicing"),
    "vae_tiling": (TINY_VAE, TINY_VAE + " --vae-tiling"),
    "seed": ("--ckpt {ckpt} --seed 5", "--ckpt {ckpt} --seed 6"),
    "batch_size": ("--ckpt {ckpt}", "--ckpt {ckpt} --batch-size 3"),
    "labels_sha256": ("--ckpt {ckpt}", "--ckpt {ckpt} --per-class 2"),
    "cfg_scale": ("--ckpt {ckpt}", "--ckpt {ckpt} --cfg-scale 3"),
    "cfg_schedule": ("--ckpt {ckpt}", "--ckpt {ckpt} --cfg-schedule linear"),
    "cfg_interval": ("--ckpt {ckpt}", "--ckpt {ckpt} --cfg-interval 0.2,0.8"),
    "steps": ("--ckpt {ckpt}", "--ckpt {ckpt} --steps 2,2,3"),
    "dtype": ("--ckpt {ckpt}", "--ckpt {ckpt} --dtype bf16"),
    "compile": ("--ckpt {ckpt}", "--ckpt {ckpt} --compile"),
    "device": pytest.param("--ckpt {ckpt} --device cpu", "--ckpt {ckpt} --device cuda", marks=CUDA_ONLY),
    "cuda_graphs": pytest.param("--ckpt {ckpt} --device cuda", "--ckpt {ckpt} --device cuda --no-cuda-graphs",
                                marks=CUDA_ONLY),
    "tf32": pytest.param("--ckpt {ckpt} --device cuda --dtype fp32", "--ckpt {ckpt} --device cuda --dtype fp32 "
                         "--no-tf32", marks=CUDA_ONLY),
}
# further cases of a field of the table
MORE_FIELD_CHANGES = {
    # a random VAE, then a VAE file
    "vae_sha256-random": (TINY_VAE, TINY_VAE + " --vae {vae}"),
    # the same images per class, the classes in another order
    "labels_sha256-order": ("--ckpt {ckpt} --class 2 --class 1", "--ckpt {ckpt} --class 1 --class 2"),
    # other content under the same names in any of the files a path stands for: a sharded checkpoint's shards
    # (its index unchanged), a VAE folder's config.json (its weights unchanged)
    "ckpt_sha256-sharded": ("--ckpt {tmp}/sharded/" + INDEX, "--ckpt {tmp}/sharded/" + INDEX, "sharded"),
    "vae_sha256-folder": (TINY_VAE + " --vae {tmp}/vae", TINY_VAE + " --vae {tmp}/vae", "vae"),
}
OUTPUTS = {"npz": ("--npz {tmp}/s.npz", "{tmp}/s.npz.parts/"), "outdir": ("--outdir {tmp}/out", "{tmp}/out/")}


def field_case(field):
    case = {**FIELD_CHANGES, **MORE_FIELD_CHANGES}[field]
    return case if isinstance(case, tuple) else case.values


def put(source, target):
    """Copy a file, or every file of a folder into the folder `target` (replacing those of the same names)."""
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy(source, target)


def start_and_interrupt(capsys, monkeypatch, args, at_call=2):
    """A run stopped by ^C during its second batch: its settings record and its first batch are written (a
    record alone, with no image saved, gives way to other settings)."""
    code, stderr = run_interrupted(capsys, monkeypatch, at_call, *args)
    assert code == 130, stderr


def test_the_field_table_covers_every_settings_field(ckpt, tmp_path, capsys, monkeypatch):
    start_and_interrupt(capsys, monkeypatch, ["--ckpt", ckpt, "--class", "1", "--outdir", tmp_path, "-q"], at_call=1)
    assert sorted(json.loads((tmp_path / "run.json").read_text())) == sorted(FIELD_CHANGES)


@pytest.mark.parametrize("output", sorted(OUTPUTS))
@pytest.mark.parametrize("field", [pytest.param(f, marks=getattr(c, "marks", ())) for f, c in FIELD_CHANGES.items()]
                         + list(MORE_FIELD_CHANGES))
def test_a_rerun_with_other_settings_is_refused(field, output, ckpt, tmp_path, capsys, monkeypatch, request):
    first, second, *replaced = field_case(field)
    files = dict(ckpt=ckpt, tmp=tmp_path)
    if "{vae}" in second:
        files["vae"] = request.getfixturevalue("vae_file")
    # a file (or a folder's files) replaced under the same name: first the one content, before the rerun the other
    contents = {"model.safetensors": ("ckpt", "ckpt_other"), "vae.safetensors": ("vae_file", "vae_other"),
                "sharded": ("ckpt_sharded", "ckpt_sharded_other"), "vae": ("vae_folder", "vae_folder_other")}
    before, after = (request.getfixturevalue(name) for name in contents[replaced[0]]) if replaced else (None, None)
    if replaced:
        put(before, tmp_path / replaced[0])
    out_args, where = OUTPUTS[output]
    common = ["--class", "1", "--per-class", "3", "--steps", "2", "--batch-size", "2", "-q",
              *out_args.format(**files).split()]
    start_and_interrupt(capsys, monkeypatch, [*common, *first.format(**files).split()])  # the last of a flag wins
    record = sorted(tmp_path.rglob("run.json"))[0].read_bytes()
    if replaced:
        put(after, tmp_path / replaced[0])
    code, stdout, stderr = run(capsys, *common, *second.format(**files).split())
    lines = [line for line in stderr.splitlines() if not line.startswith("ecar-sample: warning:")]
    assert code == 2 and stdout == "" and len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(f"ecar-sample: error: {where.format(**files)} holds images of a run with other settings (")
    key = field.split("-")[0]
    named = {"ckpt_sha256": "ckpt_sha256 (the content of --ckpt)", "vae_sha256": "vae_sha256 (the content of --vae)",
             "labels_sha256": "labels_sha256 (the images per class: --class, --per-class)"}.get(key, key)
    assert f"other settings ({named}" in line or f", {named}" in line, line
    assert "rerun that command to finish it" in line
    assert sorted(tmp_path.rglob("run.json"))[0].read_bytes() == record  # the record is left as it was


@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_a_copy_of_the_checkpoint_at_another_path_resumes_the_run(ckpt, ckpt_copy, tmp_path, capsys, monkeypatch,
                                                                   output):
    """The checkpoint is recorded by content: a run started from one path resumes from a copy staged elsewhere
    (another machine's mount, a scratch folder), and its images are those of one uninterrupted run."""
    common = ["--class", "1", "--per-class", "3", "--batch-size", "2", "-q"]
    out_args, _ = OUTPUTS[output]
    start_and_interrupt(capsys, monkeypatch, [*common, "--ckpt", ckpt, *out_args.format(tmp=tmp_path).split()])
    code, _, stderr = run(capsys, *common, "--ckpt", ckpt_copy, *out_args.format(tmp=tmp_path).split())
    assert code == 0, stderr
    (tmp_path / "one").mkdir()
    code, _, stderr = run(capsys, *common, "--ckpt", ckpt, *out_args.format(tmp=tmp_path / "one").split())
    assert code == 0, stderr
    if output == "npz":
        assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "one" / "s.npz").read_bytes()
    else:
        resumed, one = sorted((tmp_path / "out").glob("*.png")), sorted((tmp_path / "one" / "out").glob("*.png"))
        assert len(resumed) == 3 and [p.read_bytes() for p in resumed] == [p.read_bytes() for p in one]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the defaults spelled out are those of a CPU-only machine")
@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_spelling_out_a_default_is_no_change(ckpt, tmp_path, capsys, monkeypatch, output):
    common = ["--ckpt", ckpt, "--class", "1", "--per-class", "3", "--batch-size", "2", "-q",
              *OUTPUTS[output][0].format(tmp=tmp_path).split()]
    start_and_interrupt(capsys, monkeypatch, common)
    # the checkpoint recommends guidance 2; 20 steps per stage is the library default; on a machine
    # without CUDA, auto is the CPU, where fp32 is the default dtype and graphs and TF32 do not apply
    explicit = ["--cfg-scale", "2", "--steps", "20,20,20", "--cfg-schedule", "constant", "--cfg-interval", "0,1",
                "--device", "cpu", "--dtype", "fp32", "--no-cuda-graphs", "--no-tf32", "--vae-tiling"]
    code, stderr = run_interrupted(capsys, monkeypatch, 1, *common, *explicit)
    assert code == 130, stderr  # ^C in the first batch: the settings agreed and sampling had begun


@pytest.fixture(scope="module")
def interval_ckpt(tmp_path_factory):
    """The tiny checkpoint recommending guidance 2 on sigmas 0.55-1 only."""
    path = tmp_path_factory.mktemp("interval-ckpt") / "tiny.safetensors"
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=2), path,
                    extra_metadata={"recommended_cfg": "2.0", "recommended_cfg_interval": "0.55,1"})
    return path


def test_a_recommended_guidance_interval_is_the_default_of_a_rerun(interval_ckpt, tmp_path, capsys, monkeypatch):
    """Spelling out the recommended interval is no change; --cfg-interval 0,1 (everywhere) is one."""
    common = ["--ckpt", interval_ckpt, "--class", "1", "--per-class", "3", "--batch-size", "2", "-q",
              "--npz", tmp_path / "s.npz"]
    start_and_interrupt(capsys, monkeypatch, common)
    code, stderr = run_interrupted(capsys, monkeypatch, 1, *common, "--cfg-interval", "0.55,1")
    assert code == 130, stderr
    code, _, stderr = run(capsys, *common, "--cfg-interval", "0,1")
    assert code == 2 and "other settings (cfg_interval)" in stderr, stderr


# ---- every file of a resumable output is written whole or not at all ----------------------------------
def _partial_then_interrupt(path) -> None:
    """What a ^C (or a kill) in the middle of writing a file leaves: some of its bytes."""
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04\x89PNG half of a file")
    raise KeyboardInterrupt


# the kind of file: (the output, the class and method that write it, the file it writes given its arguments,
# which of its calls write that kind of file, the call interrupted)
INTERRUPTED_WRITES = {
    "npz part": ("--npz {tmp}/s.npz", zipfile.ZipFile, "__init__", lambda self, file, mode="r", *a, **k: file,
                 lambda self, file, mode="r", *a, **k: mode == "w", 2),
    "png": ("--outdir {tmp}/out", Image.Image, "save", lambda self, fp, *a, **k: fp, lambda *a, **k: True, 3),
    "settings record": ("--outdir {tmp}/out", Path, "write_text", lambda self, *a, **k: self,
                        lambda self, *a, **k: "run.json" in self.name, 1),
}


@pytest.mark.parametrize("kind", sorted(INTERRUPTED_WRITES))
def test_a_file_interrupted_while_written_is_not_left_half_written(ckpt, tmp_path, capsys, monkeypatch, kind):
    """^C in the middle of writing a part, an image or the settings record: what is on disk is only whole
    files, so the rerun resamples what was cut short and the output is byte for byte the uninterrupted one
    (a half-written file that exists would count as saved, or refuse the rerun)."""
    output, cls, method, file_of, counts, at_call = INTERRUPTED_WRITES[kind]
    common = ["--ckpt", ckpt, "--class", "1", "--class", "4", "--per-class", "2", "--steps", "2", "--batch-size",
              "3", "-q"]
    for name in ("whole", "cut"):
        (tmp_path / name).mkdir()
    assert run(capsys, *common, *output.format(tmp=tmp_path / "whole").split())[0] == 0
    real, calls = getattr(cls, method), []

    def write(*args, **kwargs):
        if counts(*args, **kwargs):
            calls.append(1)
            if len(calls) == at_call:
                _partial_then_interrupt(file_of(*args, **kwargs))
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cls, method, write)
        code, _, stderr = run(capsys, *common, *output.format(tmp=tmp_path / "cut").split())
    assert code == 130 and len(calls) == at_call, stderr
    code, _, stderr = run(capsys, *common, *output.format(tmp=tmp_path / "cut").split())
    assert code == 0, stderr

    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    assert files(tmp_path / "cut") == files(tmp_path / "whole")


def test_a_write_that_fails_is_one_line_with_status_1(ckpt, tmp_path, capsys, monkeypatch):
    """A full disk while writing an image: not the user's fault (status 1, not 2), one line, no traceback, and
    no half-written image left (the batches saved before it stay, for a rerun to resume)."""
    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--steps", "1", "--outdir", tmp_path / "out",
                               "-q")
    assert code == 1 and stdout == "", stderr
    assert stderr == "ecar-sample: error: could not write the output: [Errno 28] No space left on device\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.json"]


def test_an_unguided_rerun_resumes_whatever_guidance_schedule_and_interval_it_spells(ckpt, tmp_path, capsys,
                                                                                    monkeypatch):
    """At --cfg-scale 1 the schedule and the interval change no pixel, so a rerun that spells them otherwise
    resumes and writes what one run writes (it was refused, as if its images would differ); guided, they
    still count."""
    base = ["--ckpt", ckpt, "--class", "1", "--per-class", "3", "--steps", "2", "--batch-size", "2", "-q"]
    assert run(capsys, *base, "--cfg-scale", "1", "--outdir", tmp_path / "straight")[0] == 0
    args = [*base, "--cfg-scale", "1", "--outdir", tmp_path / "out"]
    start_and_interrupt(capsys, monkeypatch, args + ["--cfg-schedule", "linear", "--cfg-interval", "0.2,0.8"])
    assert run(capsys, *args)[0] == 0

    def images(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}

    assert len(images(tmp_path / "out")) == 3 and images(tmp_path / "out") == images(tmp_path / "straight")
    guided = [*base, "--cfg-scale", "2", "--outdir", tmp_path / "guided"]
    start_and_interrupt(capsys, monkeypatch, guided)
    code, _, stderr = run(capsys, *guided, "--cfg-schedule", "linear")
    assert code == 2 and "of a run with other settings (cfg_schedule)" in stderr, stderr


@pytest.mark.parametrize("saved_scale, now_scale, differ", [
    (1, 1.0, []),                                            # unguided both: 1 and 1.0 alike, schedules ignored
    (2.0, 1.0, ["cfg_interval", "cfg_schedule", "cfg_scale"]),   # the saved run was guided: they all count
    (1.0, 2.0, ["cfg_interval", "cfg_schedule", "cfg_scale"]),
    (2.0, 2.0, ["cfg_interval", "cfg_schedule"]),
])
def test_the_guidance_schedule_and_interval_are_ignored_only_where_both_runs_are_unguided(saved_scale, now_scale,
                                                                                          differ):
    """differing_settings leaves cfg_schedule and cfg_interval out only where both sides have cfg_scale 1:
    unguided on one side alone, the guided run's schedule shaped its pixels, and a refusal naming cfg_scale
    alone sent the user back with --cfg-scale set, to be refused again for the schedule."""
    from ecar_infer.targets import differing_settings

    saved = {"cfg_scale": saved_scale, "cfg_schedule": "constant", "cfg_interval": None, "steps": [2, 2]}
    now = {"cfg_scale": now_scale, "cfg_schedule": "linear", "cfg_interval": (0.2, 0.8), "steps": (2, 2)}
    assert differing_settings(saved, now) == sorted(differ)
    assert differing_settings(json.loads(json.dumps(now)), saved) == sorted(differ)   # either side saved


@pytest.mark.parametrize("change", ["a field missing", "a field more", "unreadable", "nested too deeply",
                                    "not an object"])
def test_a_settings_record_that_differs_in_any_way_is_refused(ckpt, tmp_path, capsys, monkeypatch, change):
    """The record agrees only if every field agrees: one the rerun lacks (written by another version, with a
    setting this one does not know) or one it has that the record lacks is a difference; a record that
    cannot be read leaves the images' settings unknown, and is refused as such."""
    args = ["--ckpt", ckpt, "--class", "1", "--per-class", "3", "--steps", "2", "--batch-size", "2", "-q",
            "--outdir", tmp_path]
    start_and_interrupt(capsys, monkeypatch, args)
    record = tmp_path / "run.json"
    saved = json.loads(record.read_text())
    images = {path: path.read_bytes() for path in tmp_path.glob("*.png")}   # the first batch's
    assert len(images) == 2
    if change == "a field missing":
        del saved["seed"]
        text, why = json.dumps(saved), "of a run with other settings (seed): "
    elif change == "a field more":
        text, why = json.dumps({**saved, "guidance_rescale": 0.7}), "of a run with other settings (guidance_rescale): "
    elif change == "unreadable":
        text, why = record.read_text()[:40], "whose settings record run.json cannot be read ("
    elif change == "nested too deeply":   # json.loads raises RecursionError here, not ValueError
        text, why = "[" * 100_000 + "]" * 100_000, "whose settings record run.json cannot be read (JSON nested too deeply)"
    else:
        text, why = json.dumps(list(saved.items())), "whose settings record run.json cannot be read (not a JSON object)"
    record.write_text(text)
    code, stdout, stderr = run(capsys, *args)
    assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert f"holds images {why}" in stderr and f"or delete {tmp_path}" in stderr, stderr
    assert record.read_text() == text and {path: path.read_bytes() for path in tmp_path.glob("*.png")} == images


def test_random_init_warns_that_the_images_are_noise(tmp_path, capsys):
    out = tmp_path / "noise.png"
    code, stdout, stderr = run(capsys, "--random-init", "ecar-tiny", "--class", "all", "--steps", "2",
                               "--cfg-schedule", "linear", "--cfg-scale", "3", "--cfg-interval", "0.2,0.9",
                               "--out", out, "--quiet")
    assert code == 0 and out.exists() and stdout == ""
    assert "ecar-sample: warning: --random-init ecar-tiny: RANDOM weights, the images are noise" in stderr
    # the route lasts as long as the command: a library caller's later warnings are not labelled ecar-sample
    import logging

    from ecar_infer.command import StderrHandler

    assert not any(isinstance(h, StderrHandler) for h in logging.getLogger("ecar_infer").handlers)


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae-ckpt") / "tiny-vae.safetensors"
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny-vae")), path)
    return path


@pytest.fixture
def corrupt_ckpt(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


USER_ERRORS = {  # arguments ({ckpt}: a good checkpoint), and what the one error line must say
    "class out of range": ("--ckpt {ckpt} --class 10", "--class 10 is outside this model's classes 0-9"),
    "range out of range": ("--ckpt {ckpt} --class 5-12", "--class 5-12 is outside"),
    "bad class": ("--ckpt {ckpt} --class seven", "class 'seven': this model has no class names"),
    "no class": ("--ckpt {ckpt}", "the following arguments are required: --class"),
    "n zero": ("--ckpt {ckpt} --class 1 --n 0", "argument --per-class/--n: must be a positive integer, got '0'"),
    "a typo's rank timeout": ("--ckpt {ckpt} --class 1 --rank-timeout 100000000000000",   # an OverflowError traceback
                              "argument --rank-timeout: must be a number of seconds in 1..10,000,000, got "
                              "'100000000000000'"),
    "steps list length": ("--ckpt {ckpt} --class 1 --steps 2,2", "--steps gives 2 values but the model has 3 stages: "
                                                                  "give one value for all stages, or one per stage (3)"),
    "steps beyond the bound": ("--ckpt {ckpt} --class 1 --steps 2,1001,2",
                               "argument --steps: must be an integer in 1..1000, got '1001'"),
    "a typo's steps": ("--ckpt {ckpt} --class 1 --steps 100000000000", "must be an integer in 1..1000"),
    "a typo's image count": ("--ckpt {ckpt} --class all --n 1000000000000 --npz {tmp}/x.npz",
                             "--class and --per-class ask for 10 x 1000000000000 = 10,000,000,000,000 images, more "
                             "than the 10,000,000 one command samples"),
    "a grid too large": ("--ckpt {ckpt} --class 0-1 --n 5001 --out {tmp}/g.png",
                         "a grid holds every image in memory until it is written, at most 10,000 (this request has "
                         "10,002); write them with --outdir DIR or --npz FILE"),
    "vae for a pixel model": ("--ckpt {ckpt} --class 1 --vae {tmp}/any", "--vae {tmp}/any: this model works in pixel "
                                                                        "space and decodes without a VAE; leave --vae out"),
    "bad interval": ("--ckpt {ckpt} --class 1 --cfg-interval 0.9,0.1", "give LO,HI with 0 <= LO <= HI <= 1"),
    "nan interval": ("--ckpt {ckpt} --class 1 --cfg-interval nan,1", "give LO,HI with 0 <= LO <= HI <= 1"),
    "cfg nan": ("--ckpt {ckpt} --class 1 --cfg-scale nan", "argument --cfg-scale: must be a finite number within "
                                                            "-10,000..10,000, got 'nan'"),
    "cfg inf": ("--ckpt {ckpt} --class 1 --cfg-scale inf", "argument --cfg-scale: must be a finite number"),
    "cfg -inf": ("--ckpt {ckpt} --class 1 --cfg-scale=-inf", "argument --cfg-scale: must be a finite number"),
    # far beyond any useful guidance, float32 overflows in the model and the images were NaN, written as black
    "cfg below -10,000": ("--ckpt {ckpt} --class 1 --cfg-scale=-10001",
                          "argument --cfg-scale: must be a finite number within -10,000..10,000"),
    "cfg beyond 10,000": ("--ckpt {ckpt} --class 1 --cfg-scale 1e30",
                          "argument --cfg-scale: must be a finite number within -10,000..10,000, got '1e30'"),
    "seed above 2**64-1": ("--ckpt {ckpt} --class 1 --seed 18446744073709551616",
                           "argument --seed: must be an integer in 0..18446744073709551615"),
    "negative seed": ("--ckpt {ckpt} --class 1 --seed -1", "argument --seed: must be an integer in 0.."),
    "seeds run past 2**64-1": ("--ckpt {ckpt} --class 1 --n 3 --seed 18446744073709551614",
                               "--seed 18446744073709551614 is too large for 3 images"),
    "grid not an image name": ("--ckpt {ckpt} --class 1 --out {tmp}/x.txt", "name the grid image with one of .png"),
    "grid named npz": ("--ckpt {ckpt} --class 1 --out {tmp}/x.npz", "name the grid image with one of .png"),
    "npz named png": ("--ckpt {ckpt} --class 1 --npz {tmp}/x.png", "--npz {tmp}/x.png: the file name must end in .npz"),
    "latent model without a vae": ("--ckpt {vae_ckpt} --class 1", "decodes through an SD-VAE: pass --vae PATH"),
    "missing checkpoint": ("--ckpt {tmp}/nowhere.safetensors --class 1", "file not found"),
    "corrupt checkpoint": ("--ckpt {corrupt} --class 1", "not a safetensors file"),
    "ckpt and random init": ("--ckpt {ckpt} --random-init ecar-tiny --class 1", "not both"),
    "out dir missing": ("--ckpt {ckpt} --class 1 --out {tmp}/no/such/dir/x.png", "does not exist"),
    # it said "directory ... does not exist" of a file
    "out under a file": ("--ckpt {ckpt} --class 1 --out {ckpt}/x.png", "{ckpt} is a file, not a directory"),
    "out is a directory": ("--ckpt {ckpt} --class 1 --out {tmp}", "it is a directory"),
    "outdir is a file": ("--ckpt {ckpt} --class 1 --outdir {corrupt}",
                         "cannot use --outdir {corrupt}: it is a file, not a folder"),
    "out empty": ("--ckpt {ckpt} --class 1 --out=", "--out is empty: give a file name"),
    "outdir empty": ("--ckpt {ckpt} --class 1 --outdir=", "--outdir is empty: give a folder name"),
    "npz empty": ("--ckpt {ckpt} --class 1 --npz=", "--npz is empty: give a file name"),
    "label rows of no grid": ("--ckpt {ckpt} --class 1 --label-rows --npz {tmp}/x.npz",
                              "--label-rows labels the rows of an --out grid: it does nothing with --npz"),
    "label rows of no grid, a folder": ("--ckpt {ckpt} --class 1 --label-rows --outdir {tmp}/out",
                                        "--label-rows labels the rows of an --out grid: it does nothing with --outdir"),
    "an abbreviation": ("--ckpt {ckpt} --class 1 --clas 4", "unrecognized arguments: --clas 4"),
    "an abbreviated option": ("--ckpt {ckpt} --class 1 --batch 2", "unrecognized arguments: --batch 2"),
    "two outputs": ("--ckpt {ckpt} --class 1 --npz a.npz --outdir d", "not allowed with argument"),
    "bad vae": ("--random-init ecar-tiny-vae --vae {tmp}/novae --class 1", "VAE not found"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_print_one_line_and_exit_2(case, ckpt, corrupt_ckpt, vae_ckpt, tmp_path, capsys):
    args, expected = USER_ERRORS[case]
    before = sorted(tmp_path.iterdir())
    files = dict(ckpt=ckpt, tmp=tmp_path, corrupt=corrupt_ckpt, vae_ckpt=vae_ckpt)
    code, stdout, stderr = run(capsys, *args.format(**files).split(), "--no-progress")
    lines = [line for line in stderr.splitlines() if not line.startswith("ecar-sample: warning:")]
    assert code == 2 and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("ecar-sample: error: ") and expected.format(**files) in lines[0], \
        stderr
    if case == "vae for a pixel model":   # refused from the config: no warning that the VAE goes unused first
        assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert sorted(tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("output", ["--outdir {ro}", "--out {ro}/grid.png", "--npz {ro}/s.npz"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_sampling(ckpt, tmp_path, capsys, monkeypatch,
                                                                            output):
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_writes_in(monkeypatch, ro)
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("the output is checked before sampling"))
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--steps", "1", *output.format(ro=ro).split())
    assert code == 2 and stdout == ""
    assert stderr == f"ecar-sample: error: cannot write to {ro}: Permission denied\n"
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("flag, suffix", [("--out", ".png"), ("--npz", ".npz")])
def test_a_name_too_long_for_its_temporary_file_is_refused_before_sampling(ckpt, tmp_path, capsys, monkeypatch,
                                                                           flag, suffix):
    """A 245-byte name fits the file system's 255, its temporary name (14 bytes longer) does not: the command
    sampled everything and then failed to write (an --npz run could never finish: every rerun failed at the
    join). Now it is refused first, status 2, one line."""
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("the output is checked before sampling"))
    target = tmp_path / ("z" * 241 + suffix)
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--steps", "1", flag, target)
    assert code == 2 and stdout == ""
    assert stderr == (f"ecar-sample: error: cannot write {target}: the name is too long for the file system once "
                      f"made into the temporary name it is written through (14 characters longer); choose a "
                      f"shorter one\n")
    assert list(tmp_path.iterdir()) == []


def test_the_guidance_bound_itself_is_accepted_on_the_command_line_as_by_the_api(ckpt, tmp_path, capsys):
    """--cfg-scale 10000 and -10000 sample, as sampler.plan(cfg_scale=10000) does: the bound is inclusive on
    both sides of the API; the next number beyond it is refused."""
    from ecar_infer.cli import guidance_float

    for weight in ("10000", "-1e4"):
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", f"--cfg-scale={weight}", "--steps", "1",
                              "--out", tmp_path / "g.png", "-q")
        assert code == 0, stderr
    with pytest.raises(argparse.ArgumentTypeError, match="within -10,000..10,000, got '10000.000000000002'"):
        guidance_float("10000.000000000002")


def test_the_largest_seeds_are_accepted(ckpt, tmp_path, capsys):
    """--seed 2**64-3 with 3 images: the last image gets seed 2**64-1, the largest torch takes."""
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--n", "3", "--seed", 2**64 - 3, "--steps", "1",
                          "--outdir", tmp_path, "-q")
    assert code == 0, stderr
    assert f"class001_seed{2**64 - 1}.png" in {p.name for p in tmp_path.iterdir()}


def test_the_bounds_a_typo_reaches_are_inclusive_and_the_grid_bound_is_a_grids(monkeypatch):
    """1000 steps per stage, MAX_IMAGES images and MAX_GRID_IMAGES images in a grid are allowed, one more is
    not; --outdir and --npz write image by image, so the grid's bound is not theirs."""
    from types import SimpleNamespace

    from ecar_infer import cli, command

    assert command.steps_spec("1000") == 1000 and command.steps_spec("1,1000,2") == (1, 1000, 2)
    monkeypatch.setattr(cli, "MAX_IMAGES", 20)
    assert len(cli.expand_classes([[None]], 10, 2)) == 20
    with pytest.raises(command.UsageError, match="ask for 10 x 3 = 30 images, more than the 20 one command samples"):
        cli.expand_classes([[None]], 10, 3)
    sampler = SimpleNamespace(config=SimpleNamespace(num_stages=3, shortcut=False))
    args = lambda **output: SimpleNamespace(steps=None, seed=0, **{"out": None, **output})  # noqa: E731
    cli.check_sampling_args(args(out="g.png"), sampler, cli.MAX_GRID_IMAGES)
    with pytest.raises(command.UsageError, match="at most 10,000 \\(this request has 10,001\\)"):
        cli.check_sampling_args(args(out="g.png"), sampler, cli.MAX_GRID_IMAGES + 1)
    for output in (dict(outdir="d"), dict(npz="x.npz")):
        cli.check_sampling_args(args(**output), sampler, cli.MAX_GRID_IMAGES + 1)


def test_a_grid_under_several_ranks_is_refused_before_any_work(tmp_path):
    from ecar_infer.cli import check_output, parse_args
    from ecar_infer.command import UsageError

    for out in (["--out", str(tmp_path / "x.png")], []):  # --out, or the default grid samples.png
        with pytest.raises(UsageError, match="under torchrun write --npz FILE or --outdir DIR"):
            check_output(parse_args(["--class", "1", *out]), world=2)
    check_output(parse_args(["--class", "1", "--npz", str(tmp_path / "x.npz")]), world=2)


def test_missing_default_checkpoint_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ecar_infer.weights, "default_checkpoint", lambda: tmp_path / "ecar-digits32.safetensors")
    code, _, stderr = run(capsys, "--class", "1", "--out", tmp_path / "x.png")
    assert code == 2 and len(stderr.splitlines()) == 1
    assert "default model is not installed" in stderr and "ecar-train" in stderr and "--random-init" in stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(ckpt, tmp_path, capsys):
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--device", "cuda", "--out", tmp_path / "x.png")
    assert code == 2 and "CUDA is not available" in stderr and len(stderr.splitlines()) == 1


def ecar_sample_command():
    """The console script installed beside this interpreter (else on PATH, else python -m)."""
    beside = Path(sys.executable).parent / "ecar-sample"
    exe = str(beside) if beside.exists() else shutil.which("ecar-sample")
    return [exe] if exe else [sys.executable, "-m", "ecar_infer.cli"]


def test_console_script_smoke(tmp_path):
    out = tmp_path / "smoke.png"
    done = subprocess.run(ecar_sample_command() + ["--random-init", "ecar-tiny", "--class", "2", "--n", "2",
                                                   "--steps", "2", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.exists() and "images/s" in done.stdout


def test_execution_flags_reach_the_sampler(ckpt, monkeypatch):
    from ecar_infer.cli import load_sampler

    seen = {}
    monkeypatch.setattr(Sampler, "from_pretrained", classmethod(lambda cls, path, **kw: seen.update(kw)))
    load_sampler(build_parser().parse_args(["--class", "1", "--ckpt", str(ckpt), "--no-tf32", "--no-cuda-graphs",
                                            "--compile"]))
    assert (seen["tf32"], seen["cuda_graphs"], seen["compile"]) == (False, False, True)
    load_sampler(build_parser().parse_args(["--class", "1", "--ckpt", str(ckpt)]))
    assert (seen["tf32"], seen["cuda_graphs"], seen["compile"]) == (True, True, False)


def test_internal_errors_are_not_user_errors(ckpt, tmp_path, monkeypatch):
    """A bug (here a ValueError from inside sampling) keeps its traceback (status 1), never one line and 2."""
    def broken(self, *args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(Sampler, "generate", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["--ckpt", str(ckpt), "--class", "1", "--out", str(tmp_path / "x.png"), "-q"])


def option_spellings():
    """Every option of ecar-sample as a user may type it (with a value where it takes one), underscores too."""
    for action in build_parser()._actions:
        for option in action.option_strings:
            value = [] if action.nargs == 0 else ["1"]
            for spelling in {option, option[:2] + option[2:].replace("-", "_")}:
                yield [spelling, *value]
                if value and spelling.startswith("--"):
                    yield [f"{spelling}=1"]


def test_every_option_reaches_the_script_through_torchrun(capsys):
    """torchrun's own parser sees the script's options too, and refuses any that abbreviates two of its own
    ("ambiguous option: --n could match --nnodes, --nproc-per-node, ..."): each option of ecar-sample must
    pass through it untouched, except --n, the short form kept for the plain command."""
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    passed, refused = [], []
    for option in option_spellings():
        script_args = [*option, "--class", "1"]
        try:
            parsed = torchrun.parse_args(["--nproc-per-node", "2", "-m", "ecar_infer.cli", *script_args])
        except SystemExit:
            refused.append(option[0].split("=")[0])
            continue
        assert parsed.training_script == "ecar_infer.cli" and parsed.training_script_args == script_args
        passed.append(option[0])
    assert sorted(set(refused)) == ["--n"], capsys.readouterr().err
    assert "--per-class" in passed and "--rank-timeout" in passed and len(passed) > 60


def test_shipped_models_by_name_and_the_color_default(tmp_path, capsys):
    """The default is the color emoji model, whose class names work with --class; the digits model stays
    available by name."""
    from PIL import Image

    code, _, stderr = run(capsys, "--class", "flags", "--per-class", "2", "--out", tmp_path / "e.png")
    assert code == 0, stderr
    assert Image.open(tmp_path / "e.png").mode == "RGB"
    code, _, stderr = run(capsys, "--ckpt", "ecar-digits32", "--class", "7", "--per-class", "2",
                          "--out", tmp_path / "d.png")
    assert code == 0, stderr
    grid = np.asarray(Image.open(tmp_path / "d.png").convert("RGB"))
    assert (grid[..., 0] == grid[..., 1]).all()   # grayscale digits


def test_a_shortcut_model_refuses_other_step_counts_in_one_line(tmp_path, capsys):
    code, _, stderr = run(capsys, "--class", "1", "--steps", "3", "--out", tmp_path / "x.png")  # the emoji default
    assert code == 2 and len(stderr.splitlines()) == 1 and "power of two" in stderr, stderr
    assert not (tmp_path / "x.png").exists()


def test_a_bad_ecar_backend_is_a_user_error(ckpt, tmp_path, capsys, monkeypatch):
    from ecar_infer.kernels import dispatch

    monkeypatch.setenv("ECAR_BACKEND", "tritn")
    dispatch.reread_environment()
    try:
        code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--steps", "1", "--out",
                                   tmp_path / "x.png", "--no-progress")
    finally:
        monkeypatch.delenv("ECAR_BACKEND")
        dispatch.reread_environment()
    assert code == 2 and stdout == "" and "Traceback" not in stderr, stderr
    assert stderr.strip() == ("ecar-sample: error: ECAR_BACKEND='tritn' is not a backend: set it to one of "
                              "('flash', 'triton', 'sdpa', 'reference', 'auto'), or unset it")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("program", ["ecar-sample", "ecar-edit"])
def test_sigterm_is_an_interrupt_while_the_commands_run(program, monkeypatch, capsys):
    """ecar-sample and ecar-edit stop on SIGTERM as on Ctrl-C (the handler ecar-train's subprocess test
    exercises): while main runs, SIGTERM raises KeyboardInterrupt; after it, the handler is back."""
    import signal

    from ecar_infer import cli, command, edit_cli

    module = cli if program == "ecar-sample" else edit_cli
    before, seen = signal.getsignal(signal.SIGTERM), []
    monkeypatch.setattr(module, "keep_freed_memory", lambda: seen.append(signal.getsignal(signal.SIGTERM)))
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert seen and seen[0] is command._raise_interrupt and signal.getsignal(signal.SIGTERM) is before
