"""`ecar-edit`: outputs, masks, modes and user errors, in-process on a tiny random checkpoint."""
import re

import numpy as np
import pytest
from PIL import Image

from conftest import fifo_at
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


def test_without_an_output_option_the_grid_is_edits_png(ckpt, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", image[0], "--mask", "left", "--class", "3", "--steps", "1",
                          "-q")
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits.png"]


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


def test_fit_reads_an_image_of_any_size_as_training_does_and_its_mask_alike(ckpt, tmp_path, capsys):
    """--fit brings a 24x20 image to the model's 16x16 by the training rule (the same pixels as training's
    load_image), and a mask image of the same size by the same rule, so it covers the same pixels."""
    from ecar_infer.training.data import load_image

    rng = np.random.default_rng(5)
    wide = rng.integers(0, 256, size=(20, 24)).astype(np.uint8)
    keep = np.zeros((20, 24), dtype=np.uint8)
    keep[:, :12] = 255   # the left half: scaled by 0.8 to 19x16, cropped by 1, it ends near column 8.6
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(keep).save(tmp_path / "keep.png")
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", tmp_path / "wide.png", "--mask", tmp_path / "keep.png",
                          "--fit", "--class", "4", "--n", "2", "--steps", "2", "--outdir", tmp_path / "out", "-q")
    assert code == 0, stderr
    fitted = load_image(tmp_path / "wide.png", 16, 1)[..., 0]
    fitted_keep = load_image(tmp_path / "keep.png", 16, 1)[..., 0] >= 128
    assert fitted_keep[:, :9].all() and not fitted_keep[:, 9:].any()
    alone = Sampler.from_pretrained(ckpt, device="cpu", progress=False).edit(
        fitted, [4, 4], mask=fitted_keep, seed=0, steps_per_stage=2, output_type="np").images[..., 0]
    for k, name in enumerate(sorted((tmp_path / "out").iterdir())):
        got = np.asarray(Image.open(name))
        assert np.array_equal(got, alone[k])
        assert np.array_equal(got[fitted_keep], fitted[fitted_keep])


def test_a_large_image_is_read_without_pillows_raw_warning(ckpt, image, tmp_path, capsys, monkeypatch):
    """Between Pillow's pixel bound and twice it (89M-179M pixels), Pillow printed its two-line
    DecompressionBombWarning; the image is read (the bound itself is PIL's, and holds: beyond twice it, an
    error). Simulated with a bound of 200 pixels and a 16x16 image."""
    import warnings

    path, _ = image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mask", "left", "--fit", "--class", "1",
                              "--steps", "1", "--out", tmp_path / "e.png", "-q")
    assert code == 0, stderr
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_fit_takes_a_mask_drawn_on_an_image_stored_sideways_as_viewers_show_it(ckpt, tmp_path, capsys):
    """A phone photo stored 24x20 with EXIF orientation 6 is read upright, 20x24; a mask drawn on it in an
    editor is 20x24 too, and --fit takes the pair (it compared the stored sizes and refused it), keeping the
    pixels the mask keeps on the upright image."""
    from ecar_infer.training.data import load_image

    rng = np.random.default_rng(6)
    stored = Image.fromarray(rng.integers(0, 256, size=(20, 24)).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6   # shown rotated by 90 degrees clockwise: 20 wide, 24 high
    stored.save(tmp_path / "phone.png", exif=exif)
    keep = np.zeros((24, 20), dtype=np.uint8)
    keep[:12] = 255   # the top half as the viewer shows it
    Image.fromarray(keep).save(tmp_path / "keep.png")
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", tmp_path / "phone.png", "--mask", tmp_path / "keep.png",
                          "--fit", "--class", "4", "--steps", "2", "--outdir", tmp_path / "out", "-q")
    assert code == 0, stderr
    upright = load_image(tmp_path / "phone.png", 16, 1)[..., 0]
    fitted_keep = load_image(tmp_path / "keep.png", 16, 1)[..., 0] >= 128
    assert fitted_keep[:6].all() and not fitted_keep[9:].any()
    got = np.asarray(Image.open(next((tmp_path / "out").iterdir())))
    assert np.array_equal(got[fitted_keep], upright[fitted_keep])


def test_fit_says_the_upright_size_of_an_image_stored_sideways_when_its_mask_differs(ckpt, tmp_path, capsys):
    """The sizes a refused --fit pair is said to have are those it is compared at, upright as viewers show
    them: a photo stored 24x20 with EXIF orientation 6 is 20x24 (it said 24x20, the size no viewer shows)."""
    stored = Image.fromarray(np.zeros((20, 24), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(np.full((24, 24), 255, np.uint8)).save(tmp_path / "square.png")
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", tmp_path / "phone.png", "--mask", tmp_path / "square.png",
                          "--fit", "--class", "4", "--steps", "1", "--out", tmp_path / "e.png", "-q")
    assert code == 2
    assert re.search(r"--mask \S*square.png is 24x24 pixels but --image \S*phone.png is 20x24 \(upright, as viewers "
                     r"show them\)", stderr), stderr


def test_every_output_of_several_batches_holds_each_image_in_its_place(ckpt, image, tmp_path, capsys):
    """With --batch-size smaller than the request (4 images in batches of 3 and 1), each file of --outdir and
    each tile of the --out grid is image k's edit (class and seed SEED+k), as the Python API returns it."""
    path, array = image
    common = ("--ckpt", ckpt, "--image", path, "--mask", "right", "--class", "2", "--class", "6", "--n", "2",
              "--seed", "11", "--steps", "2", "--batch-size", "3", "-q")
    assert run(capsys, *common, "--outdir", tmp_path / "out")[0] == 0
    assert run(capsys, *common, "--out", tmp_path / "grid.png")[0] == 0
    labels, seeds = [2, 2, 6, 6], [11, 12, 13, 14]
    expected = Sampler.from_pretrained(ckpt, device="cpu", progress=False).edit(
        array, labels, mask="right", seed=seeds, steps_per_stage=2, output_type="np", batch_size=3).images[..., 0]
    assert len({e.tobytes() for e in expected}) == 4
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 18 - 2, 2 * 18 - 2)  # two per class: a row per class
    for k, (label, seed) in enumerate(zip(labels, seeds)):
        file = tmp_path / "out" / f"class{label:03d}_seed{seed:06d}.png"
        assert np.array_equal(np.asarray(Image.open(file)), expected[k]), file.name
        row, col = divmod(k, 2)
        assert np.array_equal(grid[18 * row:18 * row + 16, 18 * col:18 * col + 16], expected[k]), k


def test_sampling_options_reach_the_edit(ckpt, image, tmp_path, capsys):
    """--cfg-scale, --cfg-schedule, --cfg-interval and --steps mean what they mean to ecar-sample: the
    output equals Sampler.edit with them, and each of them changes it (none is dropped on the way)."""
    path, array = image
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mask", "left", "--class", "3", "--n", "2",
                          "--seed", "5", "--cfg-scale", "4", "--cfg-schedule", "linear", "--cfg-interval", "0.2,0.8",
                          "--steps", "2,1,3", "--npz", tmp_path / "e.npz", "-q")
    assert code == 0, stderr
    with np.load(tmp_path / "e.npz") as data:
        got = data["arr_0"][..., 0]
    sampler = Sampler.from_pretrained(ckpt, device="cpu", progress=False)
    options = dict(cfg_scale=4.0, cfg_schedule="linear", cfg_interval=(0.2, 0.8), steps_per_stage=[2, 1, 3])
    edit = lambda **kw: sampler.edit(array, [3, 3], mask="left", seed=5, output_type="np", **kw).images[..., 0]  # noqa: E731
    assert np.array_equal(got, edit(**options))
    for name in options:  # the checkpoint's default in its place gives other images
        assert not np.array_equal(got, edit(**{k: v for k, v in options.items() if k != name})), name


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
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(tmp_path / "tall.png")   # 16 wide, 12 high
    see_through = np.full((16, 16, 4), 255, dtype=np.uint8)
    see_through[:, :8, 3] = 0
    Image.fromarray(see_through, "RGBA").save(tmp_path / "see_through.png")
    from PIL import PngImagePlugin

    chatty = PngImagePlugin.PngInfo()
    chatty.add_text("comment", "x" * (2 << 20), zip=True)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "chatty.png", pnginfo=chatty)
    out = tmp_path / "never.png"
    cases = [
        (("--image", tmp_path / "missing.png", "--mask", "left"), "--image .*missing.png: no such file"),
        # an empty path is the current folder to Path: it was "not a regular file (a folder, ...)"
        (("--image", "", "--mask", "left"), "--image is empty: give an image file"),
        (("--image", path, "--mask", ""), "--mask is empty: give an image file"),
        (("--image", tmp_path / "small.png", "--mask", "left"),
         "is 8x8 pixels but the model makes 16x16 images: resize or crop it first, or give --fit"),
        (("--image", path, "--mask", tmp_path / "small.png", "--fit"),
         "--mask .*small.png is 8x8 pixels but --image .*in.png is 16x16 \\(upright, as viewers show them\\): "
         "with --fit they must be the same size"),
        # both sides count: fitted alike, a mask of the same width but another height covers other pixels
        (("--image", path, "--mask", tmp_path / "tall.png", "--fit"),
         "--mask .*tall.png is 16x12 pixels but --image .*in.png is 16x16 \\(upright, as viewers show them\\): "
         "with --fit they must be the same size"),
        # found while --fit prepares the mask (before edit()), and said as one line too
        (("--image", path, "--mask", tmp_path / "see_through.png", "--fit"), "the mask image has transparent pixels"),
        (("--image", tmp_path / "junk.png", "--mask", "left"), "not an image file"),
        # Pillow refuses a PNG text chunk of over 1 MB with a ValueError, which was a traceback
        (("--image", tmp_path / "chatty.png", "--mask", "left"),
         "(?i)cannot read --image .*chatty.png: Decompressed data too large"),   # Pillow's case changed over versions
        (("--image", path, "--mask", tmp_path / "small.png"), "--mask .* is 8x8 pixels"),
        (("--image", path, "--mask", "middle"), "no such file, and not a built-in region"),
        # the library's errors (EditInputError), said in the command line's terms
        (("--image", path, "--mask", tmp_path / "none.png"),
         r"the mask keeps nothing of --image: .*use ecar-sample for new images \(mask pixels >= 128 are kept\)"),
        (("--image", path), "--mode inpaint needs --mask: white where the pixels are kept"),
        (("--image", path, "--mode", "vary", "--mask", "left"),
         (r"--mode vary takes no --mask \(it keeps the coarse stages below --from-stage\); .*use --mode inpaint "
          r"with --mask and --from-stage")),
        (("--image", path, "--mode", "vary", "--from-stage", "3"), "--from-stage must be an integer in 0..2"),
        (("--image", path, "--mask", "left", "--from-stage", "-1"), "--from-stage must be an integer in 0..2"),
        (("--image", path, "--mask", "left", "--mode", "erase"), "invalid choice: 'erase'"),
        (("--image", path, "--mask", "left", "--rank-timeout", "5"), "unrecognized arguments: --rank-timeout"),
    ]
    for args, message in cases:
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--out", out, *args)
        assert code == 2, (args, stderr)
        assert stderr.startswith("ecar-edit: error: ") and stderr.count("\n") == 1, stderr
        assert re.search(message, stderr), (message, stderr)
        assert not re.search(r"from_stage|generate\(\)|mode '|image\(s\)|uint8|True", stderr), stderr
        assert not out.exists()
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "12", "--image", path, "--mask", "left", "--out", out)
    assert code == 2 and "--class 12 is outside this model's classes 0-9" in stderr


@pytest.mark.parametrize("output", ["--npz {tmp}/e.npz", "--outdir {tmp}/out"])
def test_more_edits_than_memory_holds_are_refused_for_every_output(ckpt, image, tmp_path, capsys, monkeypatch,
                                                                  output):
    """ecar-edit holds every edit until it writes them, whatever the output: --npz and --outdir took a million
    (27 GB for 32x32 RGB) where --out refused 10,001; the bound is the grid's for all of them."""
    from ecar_infer import cli

    monkeypatch.setattr(cli, "MAX_GRID_IMAGES", 20)
    monkeypatch.setattr(Sampler, "edit", lambda *a, **k: pytest.fail("refused before editing"))
    path, _ = image
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "0-6", "--n", "3", "--image", path, "--mask", "left",
                          *output.format(tmp=tmp_path).split())
    assert code == 2 and stderr == ("ecar-edit: error: --class and --per-class ask for 21 edits: ecar-edit holds "
                                    "every image in memory until it writes them, whatever the output, at most 20; "
                                    "split the request (by --class, or with another --seed)\n")
    monkeypatch.setattr(cli, "MAX_GRID_IMAGES", 21)
    monkeypatch.setattr(Sampler, "edit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "0-6", "--n", "3", "--image", path, "--mask", "left",
                          *output.format(tmp=tmp_path).split())
    assert code == 130   # 21 are accepted: the edit was reached


def test_random_init_warns_in_ecar_edits_name(image, tmp_path, capsys):
    path, _ = image
    code, _, stderr = run(capsys, "--random-init", "ecar-tiny", "--class", "1", "--image", path, "--mask", "left",
                          "--steps", "1", "--out", tmp_path / "e.png", "--quiet")
    assert code == 0
    assert stderr == ("ecar-edit: warning: --random-init ecar-tiny: RANDOM weights, the images are noise (for smoke "
                      "tests and timing only)\n")


def test_an_image_too_large_to_decode_is_a_user_error(ckpt, image, tmp_path, capsys, monkeypatch):
    """PIL's refusal of a decompression bomb (neither an OSError nor a ValueError) is a user error too
    (--mask files are read by the same function)."""
    path, _ = image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # refused above 200 pixels: the 16x16 input is
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--out", tmp_path / "out.png", "--image", path,
                          "--mask", "left")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert re.search(r"ecar-edit: error: --image .*in.png is too large to decode: Image size \(256 pixels\)",
                     stderr), stderr
    assert not (tmp_path / "out.png").exists()
    code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--out", tmp_path / "out.png", "--image", path,
                          "--mask", "left", "--fit")   # with --fit, the size is not checked first: PIL's bound holds
    assert code == 2 and "--image" in stderr and "too large to decode" in stderr, stderr


@pytest.mark.parametrize("fit", [[], ["--fit"]])
def test_a_32_bit_image_of_unknown_scale_is_a_user_error(ckpt, image, tmp_path, capsys, fit):
    """A TIFF of floats up to 1000 has no known scale: one line with status 2, as an image and as a mask, with
    and without --fit (it was a traceback)."""
    Image.fromarray(np.full((16, 16), 1000.0, np.float32), "F").save(tmp_path / "deep.tif")
    for args in (("--image", tmp_path / "deep.tif", "--mask", "left"), ("--image", image[0], "--mask", tmp_path / "deep.tif")):
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--out", tmp_path / "out.png", *args, *fit)
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert "ecar-edit: error: cannot read the image: a 32-bit image (mode F) with values from 1000 to 1000" in stderr
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_a_fifo_given_as_an_image_is_a_user_error(ckpt, image, tmp_path, capsys, option):
    """PIL waited forever on a FIFO, for no writer may ever come."""
    path, _ = image
    with fifo_at(tmp_path / "fifo.png") as fifo:
        args = {"--image": path, "--mask": "left", option: fifo}
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--class", "1", "--out", tmp_path / "out.png",
                              *[str(a) for kv in args.items() for a in kv])
    assert code == 2 and stderr == (f"ecar-edit: error: {option} {fifo}: not a regular file (a folder, a FIFO or a "
                                    f"device); give an image file\n"), stderr


@pytest.mark.parametrize("output, message", [
    ("--out {tmp}/no/such/e.png", "cannot write {tmp}/no/such/e.png: directory {tmp}/no/such does not exist"),
    ("--out {tmp}", "cannot write {tmp}: it is a directory"),
    ("--out {tmp}/e.txt", "--out {tmp}/e.txt: name the grid image with one of .png"),
    ("--npz {tmp}/e.png", "--npz {tmp}/e.png: the file name must end in .npz"),
], ids=["no such folder", "a folder", "not an image name", "npz not named .npz"])
def test_an_output_that_cannot_be_written_is_refused_before_editing(ckpt, image, tmp_path, capsys, monkeypatch,
                                                                     output, message):
    path, _ = image
    monkeypatch.setattr(Sampler, "edit", lambda *args, **kwargs: pytest.fail("the output is checked before editing"))
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mask", "left", "--class", "1",
                               *output.format(tmp=tmp_path).split())
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"ecar-edit: error: {message.format(tmp=tmp_path)}"), stderr
    assert sorted(tmp_path.iterdir()) == []


def test_ctrl_c_while_the_model_loads_is_one_line(ckpt, image, capsys, monkeypatch):
    """As ecar-sample: ^C during start-up does not import the error types to match it (an import inside an
    interrupted import fails with a traceback)."""
    from ecar_infer import cli, edit_cli

    def interrupted_import(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_sampler", interrupted_import)
    monkeypatch.setattr(edit_cli, "user_errors", lambda: pytest.fail("user_errors() imported during an interrupt"))
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--image", image[0], "--mask", "left", "--class", "1")
    assert code == 130 and stdout == "" and stderr == "ecar-edit: interrupted: nothing was written\n"


def test_under_torchrun_it_refuses_to_run_every_rank_on_the_same_edit(ckpt, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(Sampler, "edit", lambda *args, **kwargs: pytest.fail("refused before editing"))
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--image", image[0], "--class", "1", "--out",
                               tmp_path / "e.png")
    assert code == 2 and stdout == "" and not list(tmp_path.iterdir())
    assert stderr == ("ecar-edit: error: ecar-edit runs in one process: run it without torchrun (every rank would "
                      "edit the same images and write the same file)\n")


def test_built_in_regions_are_case_insensitive(ckpt, image, tmp_path, capsys):
    outputs = []
    for region in ("left", "LEFT", "Left"):
        code, _, stderr = run(capsys, "--ckpt", ckpt, "--image", image[0], "--mask", region, "--class", "1",
                              "--steps", "1", "-q", "--out", tmp_path / f"{region}.png")
        assert code == 0, stderr
        outputs.append((tmp_path / f"{region}.png").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("output", ["--out {tmp}/e.png", "--outdir {tmp}/out"])
def test_a_write_that_fails_is_one_line_with_status_1_and_leaves_no_partial_file(ckpt, image, tmp_path, capsys,
                                                                                   monkeypatch, output):
    """A full disk while writing: not the user's fault (status 1, not 2), said in one line, no traceback, and
    no half-written image left behind."""
    path, _ = image

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, stdout, stderr = run(capsys, "--ckpt", ckpt, "--image", path, "--mask", "left", "--class", "1", "--n", "2",
                               "--steps", "1", "-q", *output.format(tmp=tmp_path).split())
    assert code == 1 and stdout == "", stderr
    assert stderr == "ecar-edit: error: could not write the output: [Errno 28] No space left on device\n"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_help_offers_only_what_ecar_edit_does(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--rank-timeout" not in text and "torchrun" not in text and "resume" not in text.replace("no resume", "")
    assert "DIR/class003_seed000017.png (each written atomically once all are edited; no resume)" in text
    assert "--label-rows" in text and "--no-progress" in text and "(default edits.png)" in text
    assert "for --mode vary: the last stage, e.g. 2 of a 3-stage model" in text


def test_label_rows_label_the_grid_as_ecar_sample_does(ckpt, image, tmp_path, capsys):
    from ecar_infer.class_names import label_rows

    path, _ = image
    common = ("--ckpt", ckpt, "--image", path, "--mask", "top", "--class", "3-4", "--n", "2", "--steps", "2", "-q")
    assert run(capsys, *common, "--out", tmp_path / "plain.png")[0] == 0
    assert run(capsys, *common, "--out", tmp_path / "labelled.png", "--label-rows")[0] == 0
    plain = np.asarray(Image.open(tmp_path / "plain.png"))[..., None]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "labelled.png")), label_rows(plain, ["3", "4"], 16)[..., 0])


def test_progress_bar_unless_no_progress_or_quiet(ckpt, image, tmp_path, capsys):
    path, _ = image
    common = ("--ckpt", ckpt, "--image", path, "--mask", "left", "--class", "1", "--steps", "2",
              "--out", tmp_path / "e.png")
    code, stdout, stderr = run(capsys, *common)
    assert code == 0 and "editing" in stderr and "edited 1 image in" in stdout
    for flag in ("--no-progress", "-q"):
        code, _, stderr = run(capsys, *common, flag)
        assert code == 0 and stderr == "", (flag, stderr)


def test_vary_by_default_keeps_every_stage_but_the_last(ckpt, image, tmp_path, capsys):
    path, _ = image
    common = ("--ckpt", ckpt, "--image", path, "--mode", "vary", "--class", "2", "--n", "2", "--steps", "2", "-q")
    outputs = {}
    for name, extra in {"default": (), "2": ("--from-stage", "2"), "1": ("--from-stage", "1")}.items():
        assert run(capsys, *common, *extra, "--npz", tmp_path / f"{name}.npz")[0] == 0
        with np.load(tmp_path / f"{name}.npz") as data:
            outputs[name] = data["arr_0"]
    assert np.array_equal(outputs["default"], outputs["2"])
    assert not np.array_equal(outputs["default"], outputs["1"])


def test_ctrl_c_prints_what_was_written_and_exits_130(ckpt, image, tmp_path, capsys, monkeypatch):
    from ecar_infer import targets

    path, _ = image
    common = ("--ckpt", ckpt, "--image", path, "--mask", "left", "--class", "1", "--n", "2", "--steps", "2", "-q")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    for output in (("--out", tmp_path / "e.png"), ("--outdir", tmp_path / "early")):
        with monkeypatch.context() as patch:  # while editing: nothing is written (no "0 of 2 batches" either)
            patch.setattr(Sampler, "edit", interrupt)
            code, stdout, stderr = run(capsys, *common, *output)
        assert (code, stdout, stderr) == (130, "", "ecar-edit: interrupted: nothing was written\n")
    assert not (tmp_path / "e.png").exists() and not any((tmp_path / "early").iterdir())

    sample_latents, batches = Sampler._sample_latents, []

    def interrupt_second_batch(self, *args, **kwargs):
        batches.append(len(batches))  # (holding args would keep the progress bar alive)
        if len(batches) > 1:
            raise KeyboardInterrupt
        return sample_latents(self, *args, **kwargs)

    with monkeypatch.context() as patch:  # with the progress bar on: the line comes after the closed bar
        patch.setattr(Sampler, "_sample_latents", interrupt_second_batch)
        code, _, stderr = run(capsys, *common[:-1], "--batch-size", "1", "--out", tmp_path / "e.png")
    assert code == 130 and "editing" in stderr
    assert stderr.endswith("\necar-edit: interrupted: nothing was written\n")  # on a line of its own, last
    assert not (tmp_path / "e.png").exists()

    save_image, calls = targets.save_image, []

    def save_once_then_interrupt(image, where):  # while writing --outdir: the first batch is saved
        calls.append(where)
        if len(calls) > 1:
            raise KeyboardInterrupt
        save_image(image, where)

    monkeypatch.setattr(targets, "save_image", save_once_then_interrupt)
    code, _, stderr = run(capsys, *common, "--batch-size", "1", "--outdir", tmp_path / "out")
    assert (code, stderr) == (130, f"ecar-edit: interrupted: 1 of 2 batches are saved in {tmp_path / 'out'}/\n")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["class001_seed000000.png"]


def test_sample_files_are_never_replaced(ckpt, image, tmp_path, capsys, monkeypatch):
    """An existing --npz (an FID set of ecar-sample's, finished or not), an ecar-sample --outdir, or images an
    --outdir already holds under the names this request would write: refused before editing, left as they were."""
    from ecar_infer import cli as sample_cli

    common = ("--ckpt", ckpt, "--image", image[0], "--mask", "left", "--class", "1", "--n", "2", "--steps", "1", "-q")
    samples = ("--ckpt", ckpt, "--class", "1", "--n", "2", "--steps", "1", "-q")
    assert sample_cli.main([str(a) for a in (*samples, "--npz", tmp_path / "s.npz")]) == 0
    assert sample_cli.main([str(a) for a in (*samples, "--outdir", tmp_path / "sampled")]) == 0
    (tmp_path / "u.npz.parts").mkdir()   # an interrupted ecar-sample --npz u.npz
    assert run(capsys, *common, "--outdir", tmp_path / "edited")[0] == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(Sampler, "edit", lambda *a, **k: pytest.fail("nothing should be edited"))
    for output, why in (("--npz {tmp}/s.npz", "--npz {tmp}/s.npz: {tmp}/s.npz exists, and ecar-edit does not "
                                              "replace it: write elsewhere, or delete it"),
                        ("--npz {tmp}/u.npz", "--npz {tmp}/u.npz: {tmp}/u.npz.parts exists, and ecar-edit does not "
                                              "replace it"),
                        ("--outdir {tmp}/sampled", "--outdir {tmp}/sampled holds an ecar-sample run (run.json): "
                                                   "write the edits elsewhere"),
                        ("--outdir {tmp}/edited", "--outdir {tmp}/edited already holds class001_seed000000.png and 1 "
                                                  "more of the files this request would write: write elsewhere, or "
                                                  "move them away")):
        option, where = output.format(tmp=tmp_path).split()
        code, _, stderr = run(capsys, *common, option, where)
        assert code == 2 and stderr.startswith(f"ecar-edit: error: {why.format(tmp=tmp_path)}"), stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_modes_and_regions_ecar_edit_offers_are_editings():
    """ecar-edit spells out --mode's choices and --mask's regions (its --help must not import torch, which
    editing.py does): they must stay editing.py's."""
    from ecar_infer import edit_cli, editing

    assert (edit_cli.MODES, edit_cli.REGIONS) == (editing.MODES, editing.REGIONS)
