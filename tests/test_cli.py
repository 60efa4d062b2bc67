import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ecar_infer.weights
from conftest import random_model
from ecar_infer import ECARConfig, Sampler, save_checkpoint
from ecar_infer.cli import main

TINY = ECARConfig.preset("ecar-tiny")  # pixel space, 16 px, 1 channel, 10 classes, 3 stages


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(random_model(TINY, seed=2), path, extra_metadata={"recommended_cfg": "2.0"})
    return path


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


def test_outdir_names_each_image_by_class_and_seed(ckpt, tmp_path, capsys):
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "3", "--class", "7", "--n", "2", "--seed", "17",
                          "--steps", "2", "--outdir", tmp_path / "out", "--no-progress")
    assert code == 0 and stderr == ""
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["class003_seed000017.png", "class003_seed000018.png", "class007_seed000019.png",
                     "class007_seed000020.png"]
    # the file named with class 7 and seed 20 is what that seed gives alone
    alone = Sampler.from_pretrained(ckpt, device="cpu", progress=False).generate([7], seed=20, steps_per_stage=2,
                                                                                  output_type="np")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / names[-1])), alone.images[0, ..., 0])


def test_outdir_resumes_an_interrupted_run(ckpt, tmp_path, capsys):
    args = ("--ckpt", ckpt, "--class", "2", "--n", "3", "--steps", "2", "--outdir", tmp_path / "out",
            "--batch-size", "2", "--no-progress")
    assert run(capsys, *args)[0] == 0
    files = sorted((tmp_path / "out").iterdir())
    before = {p.name: p.read_bytes() for p in files}
    files[1].unlink()  # as if the run had stopped before writing this image
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and "2 of 3 images exist" in stderr and "sampled 1 images" in stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_npz_is_an_adm_evaluator_file(ckpt, tmp_path, capsys):
    path = tmp_path / "samples.npz"
    # underscore spellings are accepted too
    code, _, _ = run(capsys, "--ckpt", ckpt, "--class", "1,4", "--n", "3", "--steps", "2", "--batch_size", "4",
                     "--cfg_scale=1.5", "--npz", path, "-q")
    assert code == 0
    with np.load(path) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 16, 16, 3)
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


def test_npz_resumes_an_interrupted_run_from_its_saved_batches(ckpt, tmp_path, capsys, monkeypatch):
    path = tmp_path / "samples.npz"
    args = ("--ckpt", ckpt, "--class", "0-2", "--n", "2", "--steps", "2", "--batch-size", "4", "--npz", path,
            "--no-progress")
    assert run(capsys, *args)[0] == 0
    with np.load(path) as data:
        whole = data["arr_0"].copy()
    path.unlink()
    with monkeypatch.context() as patch:
        interrupt_generate(patch, at_call=2)  # the second batch never finishes
        with pytest.raises(KeyboardInterrupt):
            run(capsys, *args)
    assert not path.exists()
    assert sorted(p.name for p in (tmp_path / "samples.npz.parts").iterdir()) == ["batch000000.npz", "run.json"]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0 and "1 of 2 batches exist" in stderr and "sampled 2 images" in stdout
    with np.load(path) as data:
        assert np.array_equal(data["arr_0"], whole) and data["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # the parts folder is gone


def test_npz_refuses_to_resume_a_run_with_other_settings(ckpt, tmp_path, capsys, monkeypatch):
    path = tmp_path / "samples.npz"
    common = ("--ckpt", ckpt, "--class", "1", "--n", "3", "--steps", "2", "--batch-size", "2", "--npz", path, "-q")
    with monkeypatch.context() as patch:
        interrupt_generate(patch, at_call=2)
        with pytest.raises(KeyboardInterrupt):
            run(capsys, *common, "--seed", "5")
    code, _, stderr = run(capsys, *common, "--seed", "6")
    assert code == 2 and stderr.count("\n") == 1
    assert (f"{path}.parts holds batches of an interrupted run with other settings (seed): rerun that command"
            in stderr)
    assert run(capsys, *common, "--seed", "5")[0] == 0 and path.exists()


def test_random_init_warns_that_the_images_are_noise(tmp_path, capsys):
    out = tmp_path / "noise.png"
    code, stdout, stderr = run(capsys, "--random-init", "ecar-tiny", "--class", "all", "--steps", "2",
                               "--cfg-schedule", "linear", "--cfg-scale", "3", "--cfg-interval", "0.2,0.9",
                               "--out", out, "--quiet")
    assert code == 0 and out.exists() and stdout == ""
    assert "ecar-sample: warning: --random-init ecar-tiny: RANDOM weights, the images are noise" in stderr


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
    "n zero": ("--ckpt {ckpt} --class 1 --n 0", "argument --n: must be a positive integer"),
    "steps list length": ("--ckpt {ckpt} --class 1 --steps 2,2", "steps_per_stage has 2 entries but the model has 3"),
    "bad interval": ("--ckpt {ckpt} --class 1 --cfg-interval 0.9,0.1", "cfg_interval must satisfy"),
    "missing checkpoint": ("--ckpt {tmp}/nowhere.safetensors --class 1", "file not found"),
    "corrupt checkpoint": ("--ckpt {corrupt} --class 1", "not a safetensors file"),
    "ckpt and random init": ("--ckpt {ckpt} --random-init ecar-tiny --class 1", "not both"),
    "out dir missing": ("--ckpt {ckpt} --class 1 --out {tmp}/no/such/dir/x.png", "does not exist"),
    "out is a directory": ("--ckpt {ckpt} --class 1 --out {tmp}", "it is a directory"),
    "outdir is a file": ("--ckpt {ckpt} --class 1 --outdir {corrupt}", "cannot create --outdir"),
    "two outputs": ("--ckpt {ckpt} --class 1 --npz a.npz --outdir d", "not allowed with argument"),
    "bad vae": ("--random-init ecar-tiny-vae --vae {tmp}/novae --class 1", "VAE not found"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_print_one_line_and_exit_2(case, ckpt, corrupt_ckpt, tmp_path, capsys):
    args, expected = USER_ERRORS[case]
    before = sorted(tmp_path.iterdir())
    code, stdout, stderr = run(capsys, *args.format(ckpt=ckpt, tmp=tmp_path, corrupt=corrupt_ckpt).split(),
                               "--no-progress")
    lines = [line for line in stderr.splitlines() if not line.startswith("ecar-sample: warning:")]
    assert code == 2 and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("ecar-sample: error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr
    assert sorted(tmp_path.iterdir()) == before  # nothing written


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
    from ecar_infer.cli import build_parser, load_sampler

    seen = {}
    monkeypatch.setattr(Sampler, "from_pretrained", classmethod(lambda cls, path, **kw: seen.update(kw)))
    load_sampler(build_parser().parse_args(["--class", "1", "--ckpt", str(ckpt), "--no-tf32", "--no-cuda-graphs",
                                            "--compile"]))
    assert (seen["tf32"], seen["cuda_graphs"], seen["compile"]) == (False, False, True)
    load_sampler(build_parser().parse_args(["--class", "1", "--ckpt", str(ckpt)]))
    assert (seen["tf32"], seen["cuda_graphs"], seen["compile"]) == (True, True, False)
