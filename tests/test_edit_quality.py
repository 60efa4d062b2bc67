"""The editing evaluation (ecar_infer/training/edit_quality.py) on any data set: which held-out images it
takes, the uint8 round trip with colour channels, the kept-pixel count, and the whole command on a tiny
random 3-channel model with small synthetic colour classes (no download)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import random_model
from ecar_infer import ECARConfig
from ecar_infer.training import edit_quality
from ecar_infer.training.edit_quality import pick, to_uint8, to_unit


def test_pick_takes_the_first_images_of_each_class_in_turns():
    # digits32's held-out split cycles through the classes: the first images, in order (as before)
    assert pick(np.tile(np.arange(10), 30), 10).tolist() == list(range(100))
    # a split sorted by class is interleaved; a class with fewer images drops out
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    assert pick(labels, 2).tolist() == [0, 3, 5, 1, 4, 6]
    assert pick(labels, 3).tolist() == [0, 3, 5, 1, 4, 6, 2, 7]


def test_uint8_round_trip_keeps_the_channels():
    images = np.full((2, 3, 4, 5), -1.0, np.float32)   # black
    images[0, 0] = 1.0      # red
    images[1, 2] = -0.5     # dark blue
    u = to_uint8(images)
    assert u.shape == (2, 4, 5, 3)
    assert u[0, 0, 0].tolist() == [255, 0, 0] and u[1, 3, 4].tolist() == [0, 0, 64]
    assert np.array_equal(to_uint8(to_unit(u)), u)
    assert np.abs(to_unit(u) - images).max() <= 1 / 127.5


def test_uint8_of_a_mirrored_or_float64_view_is_the_mirror_of_its_uint8():
    """to_uint8 goes through torch (the sampler's own conversion), which takes no array of negative strides:
    handed a mirrored view (a horizontal flip, images[..., ::-1]) as is, it raised instead of converting."""
    images = np.random.default_rng(0).uniform(-1.05, 1.05, (2, 3, 4, 5))   # float64, a little out of range
    mirrored = to_uint8(images[..., ::-1])
    assert np.array_equal(mirrored, to_uint8(images)[:, :, ::-1])
    assert np.array_equal(to_uint8(images), np.clip(np.round((images.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255))


class ChangesOnePixel:
    """A stand-in sampler whose edits return the input with the bottom-right pixel changed in all three
    channels (or only in `channels`): kept when the top or left half is regenerated, not when the bottom or
    right one is."""

    def __init__(self, channels=slice(None)):
        self.channels = channels

    def generate(self, labels, **kwargs):
        return SimpleNamespace(images=np.zeros((len(labels), 8, 8, 3), np.uint8))

    def edit(self, images, labels, **kwargs):
        out = images.copy()
        out[:, -1, -1, self.channels] = 255 - out[:, -1, -1, self.channels]
        return SimpleNamespace(images=out)


@pytest.mark.parametrize("channels", [slice(None), 1], ids=["all channels", "one channel"])
def test_kept_pixels_changed_counts_pixels_inside_the_kept_half(channels):
    # a pixel counts as changed when any of its channels is
    reference = SimpleNamespace(accuracy=lambda images, labels: 1.0)
    images = np.zeros((3, 3, 8, 8), np.float32)
    rows = edit_quality.completion(ChangesOnePixel(channels), reference, images, np.zeros(3, int), 1.0, seed=0)
    changed = {half: rows[half]["kept_pixels_changed"] for half in edit_quality.HALVES}
    assert changed == {"top": 3, "bottom": 0, "left": 3, "right": 0}
    assert rows["top"]["kept_pixels"] == 3 * 32


def test_seam_pooling_and_psnr_of_hand_built_images():
    # a vertical edge between columns 1 and 2 (the left/right boundary of 4 px), none between rows 1 and 2
    images = np.zeros((1, 1, 4, 4), np.float32)
    images[..., 2:] = 1.0
    images[..., 0, :] = 0.5   # row 0 differs from row 1 (away from the top/bottom boundary) and has no edge
    assert edit_quality.seam(images, "left") == edit_quality.seam(images, "right") == pytest.approx(0.75)
    assert edit_quality.seam(images, "top") == edit_quality.seam(images, "bottom") == 0.0
    # 2x2 average pooling keeps the layout: [N, C, H/2, W/2], block by block
    pooled = edit_quality.avg_pool(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), 2)
    assert pooled.tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    assert edit_quality.avg_pool(np.zeros((2, 3, 8, 8)), 4).shape == (2, 3, 2, 2)
    # PSNR per image (peak-to-peak 2), then the mean: MSE 0.04 -> 20 dB, MSE 0.0004 -> 40 dB
    a = np.zeros((2, 1, 2, 2))
    b = a + np.array([0.2, 0.02])[:, None, None, None]
    assert edit_quality.psnr(a, b) == pytest.approx(30.0)


def colour_classes(n_per_class: int, seed: int):
    """Three classes of 16x16 RGB images, sorted by class: a red, green or blue square on dark noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, size=(3 * n_per_class, 16, 16, 3)).astype(np.uint8)
    labels = np.repeat(np.arange(3), n_per_class)
    for image, c in zip(images, labels):
        y, x = rng.integers(0, 8, size=2)
        image[y:y + 8, x:x + 8, c] = 255
    return images, labels


def test_the_command_on_a_colour_data_set(tmp_path):
    from ecar_infer import save_checkpoint

    for name, (n, seed) in {"colours": (40, 0), "colours-heldout": (6, 1)}.items():
        images, labels = colour_classes(n, seed)
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels,
                 class_names=np.array(["red", "green", "blue"]))
    config = ECARConfig.preset("ecar-tiny").replace(latent_channels=3, num_classes=3)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(random_model(config, seed=3), ckpt, extra_metadata={"recommended_cfg": "2.0"})
    edit_quality.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "colours.npz"),
                       "--heldout", str(tmp_path / "colours-heldout.npz"), "--per-class", "2",
                       "--vary-images", "3", "--skip-cost", "--json", str(tmp_path / "edit.json"),
                       "--pictures", str(tmp_path)])
    report = json.loads((tmp_path / "edit.json").read_text())
    assert report["images"] == 6 and report["recommended_cfg"] == 2.0
    for setting in ("recommended", "no guidance"):
        rows = report["completion"][setting]
        assert rows["real"]["accuracy"] == 1.0   # the squares are easy: the classifier knows the originals
        for half in edit_quality.HALVES:
            assert rows[half]["kept_pixels_changed"] == 0 and rows[half]["kept_pixels"] == 6 * 16 * 8
    assert sorted(report["vary"]) == ["from_stage_0", "from_stage_1", "from_stage_2"]
    assert sorted(report["vary"]["from_stage_2"]["psnr"]) == ["stage0_4px", "stage1_8px", "stage2_16px"]
    # the pictures are named after the data and in colour; the first cell is the first held-out image
    # (class 0's first), the second is it with the top half mid-grey
    inpaint = np.asarray(Image.open(tmp_path / "edit-inpaint-colours.png"))
    assert inpaint.shape == (6 * 34 - 2, 9 * 34 - 2, 3)
    heldout = np.load(tmp_path / "colours-heldout.npz")["images"]
    assert np.array_equal(inpaint[:32, :32], heldout[0].repeat(2, 0).repeat(2, 1))
    assert np.array_equal(inpaint[32:34, :32], np.zeros((2, 32, 3)))           # the grid's padding
    second = inpaint[34:66, :32]
    assert np.array_equal(second, heldout[6].repeat(2, 0).repeat(2, 1))        # class 1's first image
    greyed = inpaint[:32, 34:66]
    assert np.all(greyed[:16] == 128) and np.array_equal(greyed[16:], inpaint[16:32, :32])
    vary = np.asarray(Image.open(tmp_path / "edit-vary-colours.png"))
    assert vary.shape == (6 * 34 - 2, 9 * 34 - 2, 3)


def test_data_of_other_classes_than_the_models_is_one_line_with_status_2(tmp_path, capsys):
    """The model's class names reach the reference: data of its classes in another order is refused, and as
    a usage error (the reference's ValueError is not a traceback)."""
    from test_quality_any_data import checkpoint_of_classes, colour_npz

    ckpt = checkpoint_of_classes(tmp_path / "gbr.safetensors", ["green", "blue", "red"])
    train, held = colour_npz(tmp_path, "train", 8, 0), colour_npz(tmp_path, "heldout", 4, 1)
    with pytest.raises(SystemExit) as exit_info:
        edit_quality.main(["--ckpt", ckpt, "--data", train, "--heldout", held, "--skip-cost"])
    assert exit_info.value.code == 2
    assert "but the model's are green, blue, red" in capsys.readouterr().err.splitlines()[-1]


def test_data_other_than_digits_needs_its_heldout_split(capsys):
    with pytest.raises(SystemExit) as exit_info:
        edit_quality.main(["--data", "emoji32.npz"])
    assert exit_info.value.code == 2 and "--heldout" in capsys.readouterr().err


def test_grey_baseline_greys_the_regenerated_half():
    # a stand-in classifier whose "accuracy" is the mean brightness, so it tells which half is grey
    reference = SimpleNamespace(accuracy=lambda images, labels: float(images.mean()))
    rows_, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    images = np.broadcast_to(rows_ / 8 + cols / 32, (2, 3, 8, 8)).astype(np.float32)   # neither half is symmetric
    rows = edit_quality.completion(ChangesOnePixel(), reference, images, np.zeros(2, int), 1.0, seed=0)
    regenerated = {"top": (slice(0, 4), slice(None)), "bottom": (slice(4, 8), slice(None)),
                   "left": (slice(None), slice(0, 4)), "right": (slice(None), slice(4, 8))}
    for half, (r, c) in regenerated.items():
        grey = images.copy()
        grey[..., r, c] = 0.0   # mid-grey
        assert rows[half]["accuracy_grey"] == pytest.approx(float(grey.mean())), half
        across = (grey[..., 4, :] - grey[..., 3, :]) if half in ("top", "bottom") else (grey[..., 4] - grey[..., 3])
        assert rows[half]["seam_grey"] == pytest.approx(float(np.abs(across).mean())), half


class Brightens:
    """A stand-in sampler whose k-th variation of an image is the image brightened by 10 (k + 1) levels, for a
    model of two stages (4 and 8 px latents)."""

    model = SimpleNamespace(plan=SimpleNamespace(num_stages=2, latent_sides=(4, 8)))

    def edit(self, images, labels, mode, from_stage, **kwargs):
        assert mode == "vary" and len(images) == 1
        return SimpleNamespace(images=np.stack([images[0] + 10 * (k + 1) for k in range(len(labels))]))


def test_variations_are_scored_against_their_own_image_and_label():
    # two flat grey images, 40 (class 0) and 120 (class 1); the stand-in classifier says class 1 when bright
    images = to_unit(np.stack([np.full((8, 8, 1), 40, np.uint8), np.full((8, 8, 1), 120, np.uint8)]))
    labels = np.array([0, 1])
    reference = SimpleNamespace(accuracy=lambda x, y: float(((x.mean(axis=(1, 2, 3)) > 0) == y).mean()))
    rows = edit_quality.variations(Brightens(), reference, images, labels, count=3, seed=0)
    assert sorted(rows) == ["from_stage_0", "from_stage_1"]
    shifts = np.array([10, 20, 30]) / 127.5              # each variation's offset from its own image
    want_psnr = float(np.mean(10 * np.log10(4 / shifts ** 2)))
    for row in rows.values():
        assert row["psnr"] == {"stage0_4px": pytest.approx(want_psnr, rel=1e-5),
                               "stage1_8px": pytest.approx(want_psnr, rel=1e-5)}
        # the mean distance between two different variations: offsets 10 or 20 levels apart, in all 64 pixels
        assert row["pairwise_l2"] == pytest.approx(np.mean([10, 20, 10]) / 127.5 * 8, rel=1e-5)
        assert row["accuracy"] == 1.0
        assert row["outs"].shape == (2, 3, 1, 8, 8)


class TimedSampler:
    """A stand-in sampler on a fake clock: each kind of run takes the seconds listed, a warm-up first."""

    SECONDS = {"generate": [50, 1, 2, 9], "left": [50, 4, 4, 4], "vary 1": [50, 3, 1, 2], "vary 2": [50, 6, 6, 30]}

    def __init__(self):
        self.clock, self.calls = 0.0, {}

    def _run(self, kind):
        self.calls[kind] = self.calls.get(kind, -1) + 1
        self.clock += self.SECONDS[kind][self.calls[kind]]

    def generate(self, labels, **kwargs):
        self._run("generate")

    def edit(self, images, labels, mask=None, mode="inpaint", from_stage=None, **kwargs):
        self._run(mask if mode == "inpaint" else f"vary {from_stage}")


def test_cost_is_the_median_timed_run_per_image(monkeypatch):
    sampler = TimedSampler()
    monkeypatch.setattr(edit_quality, "time", SimpleNamespace(perf_counter=lambda: sampler.clock))
    got = edit_quality.cost(sampler, np.zeros((2, 1, 8, 8), np.float32), np.array([0, 1]), repeats=3)
    # the median of the three timed runs (the warm-up left out), over the batch of two
    assert got == {"generate": 1.0, "inpaint (left half)": 2.0, "vary from stage 1": 1.0, "vary from stage 2": 3.0}
