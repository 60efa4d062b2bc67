"""`ecar-edit`: outputs, masks, modes and user errors, in-process on a tiny random checkpoint."""
import re

import numpy as np
import pytest
from PIL import Image

from ecar_infer import ECARConfig, Sampler
from ecar_infer.edit_cli import main

TINY = ECARConfig.preset("ecar-tiny")  # pixel space, 16 px, 1 channel, 10 classes, 3 stages



@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(16, 16)).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(array).save(path)
    return path, array


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_grid_of_inpainted_images_keeps_the_kept_half(ckpt, image, tmp_path, capsys):
    path, array = image
    out = tmp_path / "edits.png"
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mask", "left", "--class", "3", "--n", "3",
                               "--steps", "2", "--out", out, "--no-progress")
    assert code == 0, stderr
    assert "edited 3 images" in stdout and str(out) in stdout
    grid = np.asarray(Image.open(out))
    assert grid.shape == (16, 3 * 18 - 2)
    for k in range(3):
        edit = grid[:, 18 * k:18 * k + 16]
        assert np.array_equal(edit[:, 8:], array[:, 8:])       # "left" is regenerated, the right half kept
    assert not np.array_equal(grid[:, :8], grid[:, 18:26])     # two seeds, two completions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits.png"]  # no temporary files left


def test_mask_file_white_is_kept_and_outdir_names_match_the_python_api(ckpt, image, tmp_path, capsys):
    path, array = image
    keep = np.zeros((16, 16), dtype=np.uint8)
    keep[4:12, 2:9] = 255
    Image.fromarray(keep).save(tmp_path / "mask.png")
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mask", tmp_path / "mask.png", "--class", "5",
                          "--n", "2", "--seed", "7", "--steps", "2", "--outdir", tmp_path / "out", "-q")
    assert code == 0, stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["class005_seed000007.png", "class005_seed000008.png"]
    got = np.asarray(Image.open(tmp_path / "out" / names[1]))
    assert np.array_equal(got[keep > 0], array[keep > 0])
    alone = Sampler.from_pretrained(ckpt, device="cpu", progress=False).edit(
        array, [5], mask=keep > 0, seed=8, steps_per_stage=2, output_type="np")
    assert np.array_equal(got, alone.images[0, ..., 0])


def test_vary_and_outpaint_modes_and_npz_output(ckpt, image, tmp_path, capsys):
    path, array = image
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mode", "vary", "--from-stage", "2",
                          "--class", "1-2", "--steps", "2", "--npz", tmp_path / "v.npz", "-q")
    assert code == 0, stderr
    with np.load(tmp_path / "v.npz") as data:
        assert data["arr_0"].shape == (2, 16, 16, 3) and data["labels"].tolist() == [1, 2]
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mode", "outpaint", "--mask", "center",
                          "--class", "4", "--steps", "2", "--out", tmp_path / "o.png", "-q")
    assert code == 0, stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png"))[4:12, 4:12], array[4:12, 4:12])


def test_a_mask_that_keeps_everything_returns_the_input_with_a_warning(ckpt, image, tmp_path, capsys):
    path, array = image
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(tmp_path / "all.png")
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mask", tmp_path / "all.png", "--class", "1",
                          "--out", tmp_path / "e.png", "-q")
    assert code == 0
    assert "ecar-edit: warning: the mask keeps every pixel" in stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "e.png")), array)


def test_user_errors_are_one_line_with_status_2_and_write_nothing(ckpt, image, tmp_path, capsys):
    path, _ = image
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "none.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    out = tmp_path / "never.png"
    cases = [
        (("--image", tmp_path / "missing.png", "--mask", "left"), "--image .*missing.png: no such file"),
        (("--image", tmp_path / "small.png", "--mask", "left"), "is 8x8 pixels but the model makes 16x16"),
        (("--image", tmp_path / "junk.png", "--mask", "left"), "not an image file"),
        (("--image", path, "--mask", tmp_path / "small.png"), "--mask .* is 8x8 pixels"),
        (("--image", path, "--mask", "middle"), "no such file, and not a built-in region"),
        (("--image", path, "--mask", tmp_path / "none.png"), "keeps nothing"),
        (("--image", path), "mode 'inpaint' needs a mask"),
        (("--image", path, "--mode", "vary", "--mask", "left"), "takes no mask"),
        (("--image", path, "--mode", "vary", "--from-stage", "3"), "from_stage must be an integer in 0..2"),
        (("--image", path, "--mask", "left", "--mode", "erase"), "invalid choice: 'erase'"),
    ]
    for args, message in cases:
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--out", out, *args)
        assert code == 2, (args, stderr)
        assert stderr.startswith("ecar-edit: error: ") and stderr.count("\n") == 1, stderr
        assert re.search(message, stderr), (message, stderr)
        assert not out.exists()
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "12", "--image", path, "--mask", "left", "--out", out)
    assert code == 2 and "--class 12 is outside this model's classes 0-9" in stderr
