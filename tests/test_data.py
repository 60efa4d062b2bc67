"""Training data sources: image folders and .npz files on tiny generated images, the resize rule, the
resumable disk cache, and every bad-data error."""
import io
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecar_infer import ECARConfig
from ecar_infer.training import data as data_module
from ecar_infer.training import diskcache
from ecar_infer.pil_input import MAX_ASPECT, resize_center_crop
from ecar_infer.training.data import (DataError, DataDraws, PixelBatches, class_counts, list_image_folder, load_image,
                                      open_data, open_image_folder, open_npz)

RGB16 = ECARConfig.preset("ecar-tiny").replace(latent_channels=3, num_classes=3)   # 16 px, 3 classes


def random_images(n, h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def make_folder(root, sizes=((16, 16), (40, 24), (64, 64)), per_class=2):
    """classes b_cat, a_dog, c_eel (sorted: a_dog, b_cat, c_eel); images of assorted sizes and modes."""
    for k, name in enumerate(("b_cat", "a_dog", "c_eel")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[(k + i) % len(sizes)]
            Image.fromarray(random_images(1, h, w, seed=10 * k + i)[0]).save(root / name / f"{i}.png")
    return root


def test_resize_rule_box_halves_then_bicubic_then_centre_crop():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, size=(70, 140, 3), dtype=np.uint8))  # 140 wide, 70 high
    # by hand: 70 >= 2*16 -> box to 70x35; 35 >= 32 -> box to 35x17; bicubic to a shorter side of 16: 33x16;
    # then the centre 16x16 of the 33 columns starts at column 8
    step = big.resize((70, 35), Image.BOX).resize((35, 17), Image.BOX).resize((33, 16), Image.BICUBIC)
    want = np.asarray(step)[:, 8:24]
    assert np.array_equal(np.asarray(resize_center_crop(big, 16)), want)
    small = Image.fromarray(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8))
    assert np.asarray(resize_center_crop(small, 16)).shape == (16, 16, 3)   # upscaled bicubically
    # the boundary: a shorter side of exactly 2*16 is box-halved (to 24x16, then no bicubic change), not
    # bicubic-resized straight from 48x32
    edge = Image.fromarray(rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_center_crop(edge, 16)), np.asarray(edge.resize((24, 16), Image.BOX))[:, 4:20])
    # a tall image is cropped to its centre rows the same way: 20 wide, 41 high; bicubic to 16x33 (32.8 rounds
    # to 33), then rows 8..23; and an even excess, 16x20, loses 2 rows at each end
    tall = Image.fromarray(rng.integers(0, 256, size=(41, 20, 3), dtype=np.uint8))
    want = np.asarray(tall.resize((16, 33), Image.BICUBIC))[8:24]
    assert np.array_equal(np.asarray(resize_center_crop(tall, 16)), want)
    narrow = Image.fromarray(rng.integers(0, 256, size=(20, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_center_crop(narrow, 16)), np.asarray(narrow)[2:18])


def test_transparent_images_are_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8, :, :] = (255, 0, 0, 255)   # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 16, 3)
    assert (out[:8] == (255, 0, 0)).all() and (out[8:] == 255).all()
    assert load_image(tmp_path / "a.png", 16, 1).shape == (16, 16, 1)


@pytest.mark.parametrize("maxval", [None, 65535, 1023])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, maxval):
    """A 16-bit PNG opens as mode I;16, a PGM of a maximum above 255 as mode I (Pillow scales it to 0..65535):
    Pillow's own conversion to 8 bits clipped the PGM's values, so a ramp loaded nearly white."""
    ramp = np.arange(256, dtype=np.uint16).reshape(16, 16)
    if maxval is None:
        path = tmp_path / "deep.png"
        Image.fromarray(ramp * 257).save(path)
        assert Image.open(path).mode == "I;16"
    else:
        path = tmp_path / "deep.pgm"
        path.write_bytes(b"P5\n16 16\n%d\n" % maxval + np.round(ramp * (maxval / 255)).astype(">u2").tobytes())
        assert Image.open(path).mode == "I"
    out = load_image(path, 16, 1)[..., 0]
    assert np.abs(out.astype(int) - ramp).max() <= (0 if maxval != 1023 else 1)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])   # a 16-bit PNG opens as I;16, a big-endian TIFF as I;16B
def test_16_bit_grayscale_rounds_to_the_nearest_8_bit_level_whatever_its_byte_order(mode):
    """v / 257 rounded: 128 (0.498) is 0, 129 (0.502) is 1, 65534 (254.996) is 255."""
    from ecar_infer.pil_input import as_model_image

    deep = np.array([[0, 128, 129, 257 * 100 + 128], [257 * 100 + 129, 65406, 65534, 65535]], dtype=np.uint16)
    image = Image.frombytes(mode, (4, 2), deep.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    want = np.array([[0, 0, 1, 100], [101, 254, 255, 255]], dtype=np.uint8)
    assert np.array_equal(np.asarray(as_model_image(image, 1)), want)
    assert np.array_equal(np.asarray(as_model_image(image, 3)), np.repeat(want[..., None], 3, -1))


@pytest.mark.parametrize("values, mode, want", [
    ([[0, 128], [255, 200]], "I", [[0, 128], [255, 200]]),            # 32-bit integers of 8-bit values
    ([[0, 32896], [65535, 257]], "I", [[0, 128], [255, 1]]),          # of 16-bit values (ImageJ's TIFFs)
    ([[0.0, 0.5], [1.0, 0.25]], "F", [[0, 128], [255, 64]]),          # floats in [0, 1]: intensities
    ([[0.0, 100.0], [255.0, 3.0]], "F", [[0, 100], [255, 3]]),        # floats on the 8-bit scale
], ids=["I 8-bit", "I 16-bit", "F unit", "F 8-bit"])
def test_32_bit_images_are_read_by_their_range(tmp_path, values, mode, want):
    """Pillow's conversion clipped a 32-bit TIFF to 8 bits: 16-bit values came out white, [0, 1] floats black."""
    path = tmp_path / "deep.tif"
    Image.fromarray(np.array(values, dtype=np.int32 if mode == "I" else np.float32), mode).save(path)
    assert Image.open(path).mode == mode
    assert load_image(path, 2, 1)[..., 0].tolist() == want


@pytest.mark.parametrize("values, mode, why", [
    ([[0, 70000]], "I", "values from 0 to 70000"), ([[-1, 5]], "I", "values from -1 to 5"),
    ([[0.0, 300.0]], "F", "values from 0 to 300"), ([[0.0, float("nan")]], "F", "NaN or infinite values"),
])
def test_a_32_bit_image_of_unknown_scale_is_refused_by_name(tmp_path, values, mode, why):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.array(values, dtype=np.int32 if mode == "I" else np.float32), mode).save(path)
    with pytest.raises(DataError, match=re.escape(f"deep.tif: cannot read the image (a 32-bit image (mode {mode}) "
                                                  f"with {why}")):
        load_image(path, 2, 1)


def gray_and_peak_bytes(image):
    """(as_model_image(image, 1) as an array, the peak of the bytes numpy allocated meanwhile)."""
    import tracemalloc

    from ecar_infer.pil_input import as_model_image

    tracemalloc.start()
    try:
        return np.asarray(as_model_image(image, 1)), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_images_are_scaled_a_few_rows_at_a_time_in_bounded_memory(monkeypatch, mode):
    """The whole image as float64 and its temporaries took 9-17 bytes a pixel (3 GB at Pillow's largest
    size); now a few rows at a time. The range that picks the scale is still the whole image's: here its
    largest value lies in the last rows only."""
    from ecar_infer import pil_input

    side = 1000
    values = np.random.default_rng(0).integers(0, 256, (side, side))
    values[-1, -1] = 65535 if mode != "F" else 255   # I and I;16: 16-bit values; F: 8-bit ones
    image = Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert image.mode == mode
    scale = {"I;16": 1 / 257, "I": 1 / 257, "F": 1.0}[mode]
    whole = np.round(values * scale).astype(np.uint8)
    monkeypatch.setattr(pil_input, "CHUNK_PIXELS", 3 * side + 7)   # chunks of 3 rows, the last one shorter
    got, peak = gray_and_peak_bytes(image)
    assert np.array_equal(got, whole)
    assert peak < 3 * side * side, f"{peak:,} bytes for a {side}x{side} image"   # the 8-bit result, its array


@pytest.mark.parametrize("chunk", [2 * 5 + 1, 3], ids=["two rows a chunk", "a row wider than a chunk"])
def test_a_deep_images_scale_is_its_whole_range_wherever_its_extremes_lie(monkeypatch, chunk):
    """The range that picks the scale is gathered over every chunk of rows: from the last chunk alone, a
    16-bit value in the first rows was read on the 8-bit scale (and wrapped), and a negative value there
    went unrefused; a NaN is refused in any chunk, not the first only. A row wider than CHUNK_PIXELS is read
    a row at a time (a chunk of no rows: an error)."""
    from ecar_infer import pil_input

    monkeypatch.setattr(pil_input, "CHUNK_PIXELS", chunk)
    values = np.random.default_rng(1).integers(0, 256, (7, 5))
    values[0, 0] = 65535
    got = np.asarray(pil_input.as_model_image(Image.fromarray(values.astype(np.int32)), 1))
    assert np.array_equal(got, np.round(values / 257).astype(np.uint8))
    values[0, 0] = -1
    with pytest.raises(ValueError, match=r"a 32-bit image \(mode F\) with values from -1 to 25\d: its scale cannot"):
        pil_input.as_model_image(Image.fromarray(values.astype(np.float32)), 1)
    floats = values.astype(np.float32)
    floats[0, 0], floats[-1, -1] = 0, np.nan   # in the last chunk only: it was read as 0
    with pytest.raises(ValueError, match=r"a 32-bit image \(mode F\) with NaN or infinite values"):
        pil_input.as_model_image(Image.fromarray(floats), 1)


@pytest.mark.parametrize("shape", [(1, 200_000), (200_000, 1), (3, 70_001)], ids=["a row", "a column", "rows"])
def test_rows_wider_than_a_chunk_are_scaled_in_pieces(monkeypatch, shape):
    """A chunk held whole rows, at least one: Pillow takes a single row of up to 178M pixels, which then went
    to float64 whole (about 25 bytes a pixel). A row wider than CHUNK_PIXELS is cut into pieces."""
    from ecar_infer import pil_input

    values = np.random.default_rng(2).random(shape, dtype=np.float32)
    values.flat[-1] = 1.0   # the range, [0, 1]: intensities
    image = Image.fromarray(values, "F")
    monkeypatch.setattr(pil_input, "CHUNK_PIXELS", 1000)
    got, peak = gray_and_peak_bytes(image)
    assert np.array_equal(got, np.round(values.astype(np.float64) * 255).astype(np.uint8))
    # a few 8-bit copies of the result (numpy's and PIL's); a float64 of the whole row alone is 8 bytes a pixel
    assert peak < 5 * values.size, f"{peak:,} bytes for {values.size:,} pixels"


@pytest.mark.parametrize("size, chunk, tiles", [
    ((5, 7), 11, [(0, 0, (2, 5)), (2, 0, (2, 5)), (4, 0, (2, 5)), (6, 0, (1, 5))]),   # as many whole rows as fit
    ((7, 2), 3, [(0, 0, (1, 3)), (0, 3, (1, 3)), (0, 6, (1, 1)), (1, 0, (1, 3)), (1, 3, (1, 3)), (1, 6, (1, 1))]),
], ids=["whole rows", "pieces of rows"])
def test_a_deep_image_is_read_in_tiles_of_as_many_pixels_as_a_chunk_holds(monkeypatch, size, chunk, tiles):
    """Each tile holds as many whole rows as CHUNK_PIXELS allows (a row wider than that, in pieces of CHUNK_PIXELS
    and a last partial one): a tile of one row whatever the width gave the same pixels a crop a row (200,000
    crops for a column of 200,000 pixels)."""
    from ecar_infer import pil_input

    monkeypatch.setattr(pil_input, "CHUNK_PIXELS", chunk)
    values = np.arange(size[0] * size[1], dtype=np.float32).reshape(size[1], size[0])
    got = list(pil_input._tiles(Image.fromarray(values, "F")))
    assert [(top, left, v.shape) for top, left, v in got] == tiles
    for top, left, v in got:
        assert np.array_equal(v, values[top:top + v.shape[0], left:left + v.shape[1]])


def test_a_deep_image_of_no_pixels_is_read_as_pillow_reads_it():
    """A 16-bit image 0 pixels wide met a chunk of 0 columns (range() arg 3 must not be zero)."""
    from ecar_infer.pil_input import as_model_image

    assert as_model_image(Image.fromarray(np.zeros((3, 0), np.uint16)), 1).size == (0, 3)


def test_a_palette_image_with_a_transparent_colour_is_composited_on_white():
    from ecar_infer.pil_input import as_model_image

    image = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), "P")
    image.putpalette([0, 0, 0, 200, 10, 20, 0, 0, 255])
    image.info["transparency"] = 0   # palette entry 0 (black) is transparent
    assert np.asarray(as_model_image(image, 3)).tolist() == [[[255, 255, 255], [200, 10, 20]],
                                                            [[200, 10, 20], [0, 0, 255]]]
    del image.info["transparency"]   # opaque: black stays black
    assert np.asarray(as_model_image(image, 3))[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_an_image_with_a_transparent_colour_key_is_composited_on_white(tmp_path, mode):
    """A PNG's tRNS chunk marks one colour transparent in L and RGB images too (not only in palettes): that
    colour was read as it is (black here), where every viewer shows the background."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[2:6, 2:6] = (200, 0, 0)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels)
    image.save(tmp_path / "key.png", transparency=0 if mode == "L" else (0, 0, 0))
    out = load_image(tmp_path / "key.png", 8, 3)
    assert (out[0, 0] == 255).all() and (out[:2] == 255).all()
    assert out[3, 3].tolist() == ([200, 200, 200] if mode == "L" else [200, 0, 0])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_exif_orientation_is_applied_as_viewers_apply_it(tmp_path, orientation, mode):
    """A phone photo is stored sideways with an EXIF orientation tag: training and editing read it upright, as
    Pillow's ImageOps.exif_transpose shows it, for all eight orientations; the caller's image is unchanged;
    upright_size says the size it is read at; and what is read is read again as it is (the result kept the
    tag, so ecar-edit --fit, which hands its fitted image to edit(), turned a photo twice)."""
    from PIL import ImageOps

    from ecar_infer.pil_input import as_model_image, upright_size

    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, size=(6, 10, 4), dtype=np.uint8)   # 10 wide, 6 high
    pixels[..., 3] = 255   # opaque: the composite on white is the image itself
    image = (Image.fromarray(pixels[..., 0].astype(np.uint16) * 257) if mode == "I;16"
             else Image.fromarray(pixels if mode == "RGBA" else pixels[..., :3], mode))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "photo.png", exif=exif)
    base = Image.fromarray(pixels[..., 0] if mode == "I;16" else pixels[..., :3])   # the 8-bit image it holds
    base.getexif()[0x0112] = orientation
    want = np.asarray(ImageOps.exif_transpose(base))
    with Image.open(tmp_path / "photo.png") as opened:
        opened.load()
        assert opened.mode == mode
        read = as_model_image(opened, 1 if mode == "I;16" else 3)
        got = np.asarray(read)
        assert np.array_equal(got, want)
        assert opened.size == (10, 6)
        assert upright_size(opened) == read.size
        assert np.array_equal(np.asarray(as_model_image(read, 1 if mode == "I;16" else 3)), got)
    assert got.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))


def test_image_folder_classes_labels_and_cache(tmp_path):
    root = make_folder(tmp_path / "imgs")
    data = open_image_folder(root, RGB16, tmp_path / "cache")
    assert data.class_names == ["a_dog", "b_cat", "c_eel"]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert isinstance(data.pixels, np.memmap) and data.pixels.shape == (6, 16, 16, 3)
    want = load_image(root / "b_cat" / "1.png", 16, 3).copy()
    x = data.images([3])
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(want).permute(2, 0, 1).float() / 127.5 - 1)
    again = open_image_folder(root, RGB16, tmp_path / "cache")   # reuses the finished cache
    assert np.array_equal(again.pixels, data.pixels)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".lock", ".npy"]


def test_hidden_files_and_folders_inside_a_class_are_left_out(tmp_path):
    """A folder copied from a Mac holds ._NAME.png companions that are not images, and a notebook's folder a
    .ipynb_checkpoints/ of copies: like a hidden class folder, neither is data."""
    root = make_folder(tmp_path / "imgs")
    (root / "a_dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    (root / "b_cat" / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / "b_cat" / "1.png", root / "b_cat" / ".ipynb_checkpoints" / "1-checkpoint.png")
    classes, files, labels = list_image_folder(root)
    assert classes == ["a_dog", "b_cat", "c_eel"] and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert not any(part.startswith(".") for f in files for part in f.relative_to(root).parts)
    assert len(open_image_folder(root, RGB16, tmp_path / "cache")) == 6


def test_entries_named_as_images_that_are_not_files_are_left_out(tmp_path):
    """A broken link or a FIFO named NAME.png is no image of its class: listing it would stop the cache build
    with an unreadable file (or, for a FIFO, wait on it), where the listing left such entries out as it did
    before linked folders were walked."""
    root = make_folder(tmp_path / "imgs")
    (root / "a_dog" / "gone.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(root / "b_cat" / "pipe.png")
    classes, files, labels = list_image_folder(root)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and all(f.is_file() for f in files)


def test_a_folder_of_color_images_is_refused_by_a_one_channel_config(tmp_path):
    root = make_folder(tmp_path / "imgs")
    gray = RGB16.replace(latent_channels=1)
    for path in [*root.glob("a_dog/*.png"), *root.glob("b_cat/*.png")]:   # grayscale, with and without alpha
        Image.open(path).convert("LA" if "cat" in str(path) else "L").save(path)
    color = [root / "c_eel" / "0.png", root / "c_eel" / "1.png"]   # the count and the names are of these
    with pytest.raises(DataError, match=re.escape(f"imgs: 2 of 6 images are stored in color (RGB or a color "
                                                  f"palette: {color[0]}, {color[1]}) but the config has "
                                                  f"latent_channels=1; train a 3-channel config (--preset "
                                                  f"ecar-emoji32, or --set latent_channels=3), or save the images as "
                                                  f"grayscale (mode L), as gray images stored in RGB must be")):
        open_image_folder(root, gray, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()   # refused before the cache: no lock, record or full-size partial file
    # a latent model's 1-channel VAE: its config's latent_channels are the latents', not the images' (the error
    # named them and told to change them)
    with pytest.raises(DataError, match=re.escape("but the VAE takes 1 channel; use an RGB VAE, or save the images")):
        open_image_folder(root, RGB16, tmp_path / "cache", channels=1)
    Image.open(color[0]).convert("1").save(color[0])   # bilevel and 16-bit grayscale are grayscale too
    Image.fromarray(np.asarray(Image.open(color[1]).convert("L")).astype(np.uint16) * 257).save(color[1])
    assert Image.open(color[1]).mode == "I;16"
    assert open_image_folder(root, gray, tmp_path / "cache").pixels.shape == (6, 16, 16, 1)


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_palette_images_of_grays_are_grayscale(tmp_path, suffix):
    """A grayscale GIF or PNG-8 is a palette image: it counted as color, and a 1-channel config refused it. Its
    palette decides now; one color entry makes it color."""
    root = make_folder(tmp_path / "imgs")
    for path in root.rglob("*.png"):
        path.unlink()
        Image.fromarray(random_images(1, 16, 16)[0]).convert("L").convert("P").save(path.with_suffix(suffix))
    assert Image.open(next(root.rglob("*" + suffix))).mode == "P"
    gray = RGB16.replace(latent_channels=1)
    assert open_image_folder(root, gray, tmp_path / "cache").pixels.shape == (6, 16, 16, 1)
    colored = next(root.rglob("*" + suffix))
    image = Image.open(colored)
    palette = image.getpalette()
    entry = 3 * int(np.asarray(image)[0, 0])   # the entry of a pixel the image uses
    palette[entry:entry + 3] = [255, 0, 0]
    image.putpalette(palette)
    image.save(colored)
    with pytest.raises(DataError, match=r"1 of 6 images are stored in color"):
        open_image_folder(root, gray, tmp_path / "cache2")
    gray_palette = [v for k in range(256) for v in (k, k, k)]
    gray_palette[-3:] = [0, 0, 255]   # the last entry alone is a colour (a GIF's transparent or spare slot)
    image.putpalette(gray_palette)
    image.save(colored)
    with pytest.raises(DataError, match=r"1 of 6 images are stored in color"):
        open_image_folder(root, gray, tmp_path / "cache3")


@pytest.mark.parametrize("channels", [1, 3])
def test_a_finished_folder_cache_opens_no_image(tmp_path, monkeypatch, channels):
    """Every start of a run opens the data: with the cache finished, not one image file is read again (an
    ImageNet folder's headers alone take minutes), for a 1-channel config's color check as well."""
    root = make_folder(tmp_path / "imgs")
    for path in root.rglob("*.png"):
        Image.open(path).convert("L").save(path)
    config = RGB16.replace(latent_channels=channels)
    built = np.asarray(open_image_folder(root, config, tmp_path / "cache").pixels)

    def no_open(path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(data_module, "open_image", no_open)
    assert np.array_equal(open_image_folder(root, config, tmp_path / "cache").pixels, built)


def test_a_folder_of_grayscale_images_is_replicated_for_a_three_channel_config(tmp_path):
    root = make_folder(tmp_path / "imgs")
    for path in root.rglob("*.png"):
        Image.open(path).convert("L").save(path)
    pixels = np.asarray(open_image_folder(root, RGB16, tmp_path / "cache").pixels)
    assert pixels.shape == (6, 16, 16, 3) and pixels.std() > 0
    assert (pixels == pixels[..., :1]).all()


def test_identity_is_the_content_not_the_path(tmp_path):
    images, labels = random_images(5, 16, 16), np.arange(5) % 3
    one = data_module.ImageSet(images, labels, ["a", "b", "c"], "one.npz")
    assert one.identity() == data_module.ImageSet(images.copy(), labels, ["a", "b", "c"], "moved/one.npz").identity()
    assert one.identity() == {"class_names": ["a", "b", "c"], "images": 5, "sha256": one.identity()["sha256"]}
    changed = images.copy()
    changed[4, 0, 0, 0] ^= 1
    for other in (data_module.ImageSet(changed, labels, ["a", "b", "c"], "one.npz"),
                  data_module.ImageSet(images, labels[::-1].copy(), ["a", "b", "c"], "one.npz")):
        assert other.identity()["sha256"] != one.identity()["sha256"]


def test_identity_hashes_every_image_of_a_small_set_and_both_ends_of_a_large_one():
    """Up to 64 images each counts; past that, 64 evenly spaced ones, the first and the last among them."""
    for n, rows in ((64, range(64)), (200, (0, 199))):
        images, labels = random_images(n, 2, 2, seed=n), np.arange(n) % 3
        whole = data_module.ImageSet(images, labels, ["a", "b", "c"], "set.npz").identity()["sha256"]
        for row in rows:
            changed = images.copy()
            changed[row, 1, 1, 2] ^= 1
            assert data_module.ImageSet(changed, labels, ["a", "b", "c"], "set.npz").identity()["sha256"] != whole, row


def test_an_image_rewritten_in_place_at_the_same_size_is_decoded_again(tmp_path):
    """A BMP of the same dimensions has the same byte size: only its modification time tells the cache."""
    root = make_folder(tmp_path / "imgs")
    image = root / "b_cat" / "0.bmp"
    Image.fromarray(random_images(1, 16, 16, seed=1)[0]).save(image)
    before = open_image_folder(root, RGB16, tmp_path / "cache")
    row = before.class_names.index("b_cat") * 2   # b_cat's files, sorted: 0.bmp, 0.png, 1.png
    assert np.array_equal(before.pixels[row], load_image(image, 16, 3))
    size, mtime_ns = image.stat().st_size, image.stat().st_mtime_ns
    Image.fromarray(random_images(1, 16, 16, seed=2)[0]).save(image)
    os.utime(image, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    assert image.stat().st_size == size
    after = open_image_folder(root, RGB16, tmp_path / "cache")
    assert np.array_equal(after.pixels[row], load_image(image, 16, 3))
    assert not np.array_equal(after.pixels[row], before.pixels[row])


def test_npz_is_memory_mapped_in_place_or_cached_when_compressed_or_resized(tmp_path):
    images, labels = random_images(5, 16, 16), np.array([0, 1, 2, 1, 0])
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=images, labels=labels, class_names=np.array(["x", "y", "z"]))
    data = open_npz(plain, RGB16, tmp_path / "cache")
    assert isinstance(data.pixels, np.memmap) and data.class_names == ["x", "y", "z"]
    assert np.array_equal(data.pixels, images) and not (tmp_path / "cache").exists()
    packed = tmp_path / "packed.npz"
    np.savez_compressed(packed, images=images, labels=labels)
    data = open_npz(packed, RGB16, tmp_path / "cache")
    assert np.array_equal(data.pixels, images) and data.class_names == ["0", "1", "2"]
    bigger = tmp_path / "bigger.npz"
    np.savez_compressed(bigger, images=random_images(3, 40, 32), labels=np.array([0, 1, 2]))
    data = open_npz(bigger, RGB16, tmp_path / "cache")
    want = np.asarray(resize_center_crop(Image.fromarray(np.load(bigger)["images"][2]), 16))
    assert np.array_equal(data.pixels[2], want)


def test_an_adm_layout_npz_trains_as_is(tmp_path):
    """`arr_0` and `labels`, as the ADM evaluator reads them and ecar-sample --npz writes them, memory-mapped or
    compressed; `images` comes first where a file holds both."""
    from ecar_infer.output import save_npz

    images, labels = random_images(4, 16, 16), [2, 0, 1, 2]
    save_npz(images, labels, tmp_path / "samples.npz")
    data = open_npz(tmp_path / "samples.npz", RGB16, tmp_path / "cache")
    assert isinstance(data.pixels, np.memmap) and np.array_equal(data.pixels, images)
    assert data.labels.tolist() == labels and data.class_names == ["0", "1", "2"]
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images, labels=labels)
    assert np.array_equal(open_npz(tmp_path / "packed.npz", RGB16, tmp_path / "cache").pixels, images)
    np.savez(tmp_path / "both.npz", images=images, arr_0=images[::-1], labels=labels)
    assert np.array_equal(open_npz(tmp_path / "both.npz", RGB16, tmp_path / "cache").pixels, images)


def test_an_interrupted_cache_build_resumes_and_a_changed_key_rebuilds(tmp_path):
    rows = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    asked, interrupt = [], [False, True]

    def fill(a, b):
        asked.append(a)
        if a == 3 and interrupt[-1]:
            interrupt.pop()
            raise KeyboardInterrupt   # interrupted in the second chunk
        return rows[a:b]

    path = tmp_path / "c.npy"
    with pytest.raises(KeyboardInterrupt):
        diskcache.cached_array(path, {"v": 1}, (7, 2), np.float32, fill, chunk=3)
    assert not path.exists()   # nothing half-built is published
    asked.clear()
    out = diskcache.cached_array(path, {"v": 1}, (7, 2), np.float32, fill, chunk=3)
    assert asked == [3, 6] and np.array_equal(out, rows)   # rows 0-2 were not computed again
    asked.clear()
    assert np.array_equal(diskcache.cached_array(path, {"v": 1}, (7, 2), np.float32, fill, chunk=3), rows)
    assert asked == []
    diskcache.cached_array(path, {"v": 2}, (7, 2), np.float32, fill, chunk=3)
    assert asked == [0, 3, 6]


@pytest.mark.parametrize("damage", ["cut short", "garbage", "another shape", "progress not a count",
                                    "progress beyond the rows", "partial cut short", "partial rows cut short"])
def test_a_damaged_cache_file_is_built_again(tmp_path, damage):
    """The cache's own files, damaged (a crash, a full disk, a copy cut short), were read as they were: a
    ValueError naming no file (mmap length, int()), an IndexError at a training step for an array of another
    shape, or unfilled rows published as done for a progress record beyond them or a partial file shorter than it. They are
    built again now."""
    rows = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    asked = []

    def fill(a, b):
        asked.append(a)
        return rows[a:b]

    path = tmp_path / "c.npy"
    diskcache.cached_array(path, {"v": 1}, (7, 2), np.float32, fill, chunk=3)
    if damage == "cut short":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"garbage")
    elif damage == "another shape":
        np.save(path, rows[:2])
    else:   # an interrupted build: the partial file and its progress record
        path.rename(tmp_path / "c.partial.npy")
        (tmp_path / "c.progress").write_text({"progress not a count": "three", "progress beyond the rows": "99",
                                              "partial cut short": "3", "partial rows cut short": "3"}[damage])
        if damage == "partial cut short":
            (tmp_path / "c.partial.npy").write_bytes(b"\x93NUMPY")
        elif damage == "partial rows cut short":   # a whole header and one row: opened for writing, numpy would
            partial = tmp_path / "c.partial.npy"   # lengthen it with zeros, published as rows 1 and 2
            partial.write_bytes(partial.read_bytes()[:-6 * rows[0].nbytes])
    asked.clear()
    out = diskcache.cached_array(path, {"v": 1}, (7, 2), np.float32, fill, chunk=3)
    assert asked == [0, 3, 6] and np.array_equal(out, rows)


def test_a_build_interrupted_in_its_first_chunk_starts_afresh(tmp_path):
    """The partial file exists from the start, before any progress is recorded: it holds no finished rows."""
    rows = np.arange(1, 7 * 2 + 1, dtype=np.float32).reshape(7, 2)
    asked = []

    def interrupted(a, b):
        raise KeyboardInterrupt

    def fill(a, b):
        asked.append(a)
        return rows[a:b]

    path = tmp_path / "c.npy"
    with pytest.raises(KeyboardInterrupt):
        diskcache.cached_array(path, {"v": 1}, (7, 2), np.float32, interrupted, chunk=3)
    assert not path.exists()
    out = diskcache.cached_array(path, {"v": 1}, (7, 2), np.float32, fill, chunk=3)
    assert asked == [0, 3, 6] and np.array_equal(out, rows)


def test_flips_mirror_exactly_the_drawn_rows():
    images = np.random.default_rng(0).uniform(-1, 1, size=(4, 1, 8, 8)).astype(np.float32)
    from ecar_infer.training.data import ImageSet

    batches = PixelBatches(ImageSet(images, np.zeros(4, np.int64), ["a"], "t"), flip=True)
    draws = DataDraws(flip=torch.tensor([True, False, True]))
    x = batches.x0(torch.tensor([0, 1, 3]), draws)
    torch.testing.assert_close(x[0], torch.from_numpy(images[0]).flip(-1))
    torch.testing.assert_close(x[1], torch.from_numpy(images[1]))
    torch.testing.assert_close(x[2], torch.from_numpy(images[3]).flip(-1))
    share = batches.draw(torch.Generator().manual_seed(0), 4000).flip.float().mean().item()
    assert 0.47 < share < 0.53
    # without --flip nothing is flipped and the step's generator is not drawn from
    plain, gen = PixelBatches(batches.images), torch.Generator().manual_seed(0)
    state = gen.get_state()
    draws = plain.draw(gen, 3)
    assert draws.flip is None and torch.equal(gen.get_state(), state)
    torch.testing.assert_close(plain.x0(torch.tensor([0, 1, 3]), draws), torch.from_numpy(images[[0, 1, 3]]))


# ---- bad data ------------------------------------------------------------------------------------
def test_unreadable_image_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "b_cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b_cat/broken.png: cannot read the image"):
        open_image_folder(root, RGB16, tmp_path / "cache")


def test_every_file_that_is_not_an_image_is_named_before_any_decoding(tmp_path, monkeypatch):
    """In any chunk of the cache build: the first 20 by name, then a count."""
    monkeypatch.setattr(data_module, "CACHE_CHUNK", 2)   # a_dog, b_cat and c_eel decode in separate chunks
    root = make_folder(tmp_path / "imgs")
    for i in range(11):
        (root / "a_dog" / f"bad{i:02d}.png").write_bytes(b"not a png")
        (root / "c_eel" / f"bad{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(DataError) as error:
        open_image_folder(root, RGB16, tmp_path / "cache")
    message = str(error.value)
    assert message.startswith("22 images cannot be read: ") and message.endswith("and 2 more; remove or replace them")
    assert message.count("cannot identify image file") == 20 and "\n" not in message
    assert "a_dog/bad00.png" in message and "c_eel/bad08.jpg" in message and "c_eel/bad09.jpg" not in message


def test_an_image_too_large_to_decode_is_named_not_decoded(tmp_path, monkeypatch):
    """PIL refuses a decompression bomb with an error that is neither OSError nor ValueError; it must still
    end in a DataError naming the file. A 64x64 image stands in for a huge one under a lowered limit."""
    root = make_folder(tmp_path / "imgs", sizes=((16, 16),))
    Image.fromarray(random_images(1, 64, 64)[0]).save(root / "c_eel" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # refused above 2,000 pixels: 4,096 is, 256 is not
    with pytest.raises(DataError, match=r"c_eel/huge.png: cannot read the image \(too large to decode: .*4096 pixels"):
        open_image_folder(root, RGB16, tmp_path / "cache")
    with pytest.raises(DataError, match="huge.png: cannot read the image"):
        load_image(root / "c_eel" / "huge.png", 16, 3)


def test_images_that_fail_to_decode_are_named_together(tmp_path):
    """Truncated images pass the header check and fail in the decoding; those of a chunk are named at once."""
    root = make_folder(tmp_path / "imgs", sizes=((64, 64),))
    for name in ("a_dog/1.png", "c_eel/0.png"):
        whole = (root / name).read_bytes()
        (root / name).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"^2 images cannot be read: .*a_dog/1.png \(.*truncated.*\), "
                                        r".*c_eel/0.png \(.*truncated.*\); remove or replace them$"):
        open_image_folder(root, RGB16, tmp_path / "cache")


def test_images_that_fail_to_decode_in_later_chunks_are_named_with_the_first_and_the_build_is_deleted(
        tmp_path, monkeypatch):
    """With chunks of 2 images, truncated files in the first and the last chunk: the build reported only the
    first, and mending it changed the key, so the next build decoded everything again to find the second (once
    per bad file), leaving a full-size partial file behind each time. Now both are named at once and the failed
    build leaves no file but its lock; after mending both, one build finishes."""
    monkeypatch.setattr(data_module, "CACHE_CHUNK", 2)
    root = make_folder(tmp_path / "imgs", sizes=((64, 64),))
    files = sorted(root.rglob("*.png"))
    bad = [files[0], files[-1]]
    whole = {path: path.read_bytes() for path in bad}
    for path in bad:
        path.write_bytes(whole[path][: len(whole[path]) // 2])
    kept = []   # what each pass over the files holds until it returns
    real_attempt = data_module._attempt_each
    monkeypatch.setattr(data_module, "_attempt_each", lambda *a: kept.append(real_attempt(*a)[0]) or
                        real_attempt(*a))
    with pytest.raises(DataError, match=r"^2 images cannot be read: .*a_dog/0.png .*c_eel/1.png"):
        open_image_folder(root, RGB16, tmp_path / "cache")
    assert sorted(f.suffix for f in (tmp_path / "cache").iterdir()) == [".lock"]
    scan = kept[-1]   # the search for the other bad files keeps no image (ImageNet's rest would not fit)
    assert len(scan) == 4 and not any(isinstance(r, np.ndarray) for r in scan)
    monkeypatch.setattr(data_module, "_attempt_each", real_attempt)
    monkeypatch.setattr(data_module, "POOL_SLICE", 3)
    reports = []   # and it reports its progress, slice by slice, as the build does
    with pytest.raises(DataError):
        open_image_folder(root, RGB16, tmp_path / "cache", report=lambda done, total: reports.append((done, total)))
    assert reports == [(5, 6), (6, 6)]
    for path in bad:
        path.write_bytes(whole[path])
    assert open_image_folder(root, RGB16, tmp_path / "cache").pixels.shape == (6, 16, 16, 3)


def test_a_change_of_the_decoding_rules_rebuilds_a_folder_cache(tmp_path, monkeypatch):
    """A cache decoded under older rules (before EXIF orientation, say) is not reused: the rules' number is
    part of its key."""
    root = make_folder(tmp_path / "imgs")
    first = open_image_folder(root, RGB16, tmp_path / "cache").fingerprint
    assert open_image_folder(root, RGB16, tmp_path / "cache").fingerprint == first
    monkeypatch.setattr(data_module, "DECODE_RULES", data_module.DECODE_RULES + 1)
    assert open_image_folder(root, RGB16, tmp_path / "cache").fingerprint != first


def test_the_decoding_threads_are_handed_the_files_a_slice_at_a_time(tmp_path, monkeypatch):
    """A pool given every file at once held a pending task for each (2 GB for ImageNet's 1.28M files): the
    files go POOL_SLICE at a time, and the results come back in order."""
    from concurrent.futures import ThreadPoolExecutor

    handed = []
    real_map = ThreadPoolExecutor.map
    monkeypatch.setattr(ThreadPoolExecutor, "map", lambda self, fn, items: handed.append(len(items)) or
                        real_map(self, fn, items))
    monkeypatch.setattr(data_module, "POOL_SLICE", 3)
    files = [Path(f"f{k}") for k in range(8)]
    assert data_module._each_image(lambda f: f.name, files, 2) == [f.name for f in files]
    assert handed == [3, 3, 2]


def test_empty_class_and_missing_classes_are_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "d_fox").mkdir()
    (root / "d_fox" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"d_fox: class 'd_fox' has no images"):
        open_image_folder(root, RGB16.replace(num_classes=4), tmp_path / "cache")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        open_image_folder(tmp_path / "flat", RGB16, tmp_path / "cache")


@pytest.mark.parametrize("class_names, config_classes, empty", [(["a", "b", "c"], 3, r"2 \(c\)"), (None, 3, "2")])
def test_npz_class_without_images_is_named(tmp_path, class_names, config_classes, empty):
    path = tmp_path / "d.npz"
    extra = {} if class_names is None else {"class_names": np.array(class_names)}
    np.savez(path, images=random_images(4, 16, 16), labels=np.array([0, 1, 1, 0]), **extra)
    with pytest.raises(DataError, match=f"d.npz: no images of class\\(es\\) {empty} of the 3 classes; add images"):
        open_npz(path, RGB16.replace(num_classes=config_classes), tmp_path / "cache")


@pytest.mark.parametrize("class_names, problem", [(["a", "A", "b"], "differ only in case"),
                                                  (["a", " ", "b"], "non-empty strings"),
                                                  (["a", "x\ny", "b"], "control character")])
def test_npz_bad_class_names_name_the_file(tmp_path, class_names, problem):
    path = tmp_path / "d.npz"
    np.savez(path, images=random_images(3, 16, 16), labels=np.arange(3), class_names=np.array(class_names))
    with pytest.raises(DataError, match=f"d.npz: class_names .*{problem}.*; give each class a distinct"):
        open_npz(path, RGB16, tmp_path / "cache")


def test_class_count_must_match_the_config_and_the_error_shows_the_classes_found(tmp_path):
    """The classes are listed with their image counts: data/train and data/val as the two "classes" of
    --data data is then plain to see, and the error says what else may be meant."""
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"imgs: 3 classes \(a_dog: 2 images, b_cat: 2, c_eel: 2\) but the config has "
                                        r"num_classes=10; use --set num_classes=3, or point --data at the folder "
                                        r"whose sub-folders are the classes"):
        open_image_folder(root, RGB16.replace(num_classes=10), tmp_path / "cache")
    assert class_counts([f"c{k}" for k in range(25)], np.arange(25).repeat(2), limit=3) == \
        "c0: 2 images, c1: 2, c2: 2 and 22 more"


def test_class_counts_show_every_class_and_only_a_real_remainder():
    """Exactly `limit` classes are all shown, with no "and 0 more"; a class without images (digits32 with
    --train-size below 10) is shown with 0, not left out of the run's log."""
    assert class_counts(["a", "b", "c"], [0, 1, 2, 2], limit=3) == "a: 1 images, b: 1, c: 2"
    assert class_counts(["a", "b", "c"], [0, 0]) == "a: 2 images, b: 0, c: 0"


def test_linked_folders_inside_a_class_are_followed_once(tmp_path):
    """A linked sub-folder's images belong to its class (as torchvision's ImageFolder has them; Path.rglob left
    them out without a word), a link back up does not loop, and a folder reached twice counts once."""
    root = make_folder(tmp_path / "imgs")
    elsewhere = tmp_path / "more_dogs"
    elsewhere.mkdir()
    for i in range(3):
        shutil.copy(root / "a_dog" / "0.png", elsewhere / f"extra{i}.png")
    (root / "a_dog" / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "a_dog" / "again").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(root / "a_dog", target_is_directory=True)   # a loop
    classes, files, labels = list_image_folder(root)
    assert labels.tolist() == [0] * 5 + [1, 1, 2, 2]
    dogs = [f.relative_to(root / "a_dog").as_posix() for f in files[:5]]
    assert dogs[:2] == ["0.png", "1.png"] and sorted(Path(d).name for d in dogs[2:]) == ["extra0.png", "extra1.png",
                                                                                       "extra2.png"]


@pytest.mark.parametrize("labels, problem", [([0, 1, 3], r"label 3 of image 2 is outside the classes 0-2 \(1 such "
                                                        r"label\(s\)\); give `class_names` one name per class, or "
                                                        r"leave it out and --set num_classes=4"),
                                             # the advice counts the classes up to the largest label
                                             ([0, 5, 1], r"label 5 of image 1 is outside the classes 0-2 .*"
                                                         r"--set num_classes=6$"),
                                             # no class count fixes a negative label
                                             ([0, -1, 1], "label -1 of image 1 is outside the classes 0-2 "
                                                          r"\(1 such label\(s\)\); labels count the classes from 0$"),
                                             ([0.0, 1.0, 2.0], "labels must be a 1-D integer array")])
def test_npz_labels_out_of_range(tmp_path, labels, problem):
    path = tmp_path / "d.npz"
    np.savez(path, images=random_images(3, 16, 16), labels=np.array(labels))
    with pytest.raises(DataError, match=f"d.npz: {problem}"):
        open_npz(path, RGB16, tmp_path / "cache")


@pytest.mark.parametrize("arrays, problem", [
    (dict(labels=np.array(1)), r"labels must be a 1-D integer array, got int64 \[\]"),
    (dict(class_names=np.array("abc")), r"`class_names` must be a 1-D array of strings \(np.array\(names\)\), got <U3 \[\]"),
    (dict(class_names=np.array([b"a", b"b", b"c"])), r"`class_names` must be a 1-D array of strings .*got \|S1 \[3\]"),
    (dict(class_names=np.arange(3)), r"`class_names` must be a 1-D array of strings .*got int64 \[3\]"),
    (dict(images=np.zeros((3, 0, 16, 3), np.uint8)), r"`images` must be uint8 .*\(and H, W at least 1\), got uint8 \[3, 0, 16, 3\]"),
], ids=["labels 0-d", "class_names 0-d", "class_names bytes", "class_names numbers", "images of no pixels"])
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_arrays_of_the_wrong_form_are_named(tmp_path, arrays, problem, save):
    """Arrays the loader would trip over (a TypeError, a division by zero) or misread (bytes as "b'a'") are named."""
    path = tmp_path / "d.npz"
    save(path, **{"images": random_images(3, 16, 16), "labels": np.arange(3), **arrays})
    with pytest.raises(DataError, match=f"d.npz: {problem}"):
        open_npz(path, RGB16, tmp_path / "cache")


@pytest.mark.parametrize("arrays, problem", [
    (dict(labels=np.zeros(10, np.int64)), r"3 images but `labels` of shape \[10\]: give one label per image"),
    (dict(class_names=np.array(["a", "b", "c", "d"])), r"`class_names` of <U1 \[4\] for 3 images"),
    (dict(class_names=np.array(["x" * 1025, "b"])), r"`class_names` of <U1025 \[2\] for 3 images: give a 1-D array of "
                                                    r"one name per class, each of at most 1,024 characters"),
], ids=["more labels than images", "more class names than images", "a class name too long"])
def test_labels_and_class_names_are_bounded_by_the_image_count_before_they_are_loaded(tmp_path, arrays, problem,
                                                                                       monkeypatch):
    """A zip bomb of a few MB declaring 400 million labels was loaded whole (3.4 GB) before its count was
    compared with the images'. The headers are read first now; the members are never loaded."""
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **{"images": random_images(3, 16, 16), "labels": np.arange(3), **arrays})
    loaded = np.lib.npyio.NpzFile.__getitem__

    def refuse_the_bounded(self, key):
        assert key not in arrays, f"{key} was loaded"
        return loaded(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", refuse_the_bounded)
    with pytest.raises(DataError, match=f"d.npz: {problem}"):
        open_npz(path, RGB16, tmp_path / "cache")


def npy_bytes(array: np.ndarray, shape=None) -> bytes:
    """An .npy file of `array`, its header declaring `shape` (default: the array's own)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                  "fortran_order": False, "shape": shape or array.shape})
    return header.getvalue() + array.tobytes()


@pytest.mark.parametrize("member, shape, problem", [
    ("labels", (10**12,), r"`labels` describes int64 \[1000000000000\] \(8,000,000,000,128 bytes\) but holds "
                          r"152 bytes: the file is truncated or damaged; write it again"),
    ("images", (3, 16, 32, 3), r"`images` describes uint8 \[3, 16, 32, 3\] .* but holds 2,432 bytes"),
    ("images", (3, 10**6, 10**6, 3), r"`images` describes uint8 \[3, 1000000, 1000000, 3\]"),
    ("class_names", (10**10,), r"`class_names` describes <U3 \[10000000000\]"),
], ids=["labels beyond any memory", "images beyond their data", "images beyond any memory",
        "class names beyond any memory"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_npz_member_declaring_more_than_it_holds_is_named(tmp_path, member, shape, problem, compression):
    """numpy allocates what a member's header declares before reading it (a MemoryError), and the rows of a
    compressed member came up short in the cache build (a reshape's ValueError): both are a DataError now,
    before any image is decoded."""
    path = tmp_path / "d.npz"
    arrays = {"images": random_images(3, 16, 16), "labels": np.arange(3), "class_names": np.array(["ant", "bee", "cow"])}
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, array in arrays.items():
            archive.writestr(name + ".npy", npy_bytes(array, shape if name == member else None))
    if member == "images" and compression == zipfile.ZIP_STORED:
        problem = r"cannot read the .npz \(mmap length is greater than file size\)"   # memory-mapped: numpy checks
    with pytest.raises(DataError, match=f"d.npz: {problem}"):
        open_npz(path, RGB16, tmp_path / "cache")


@pytest.mark.parametrize("member, problem", [
    ("images", r"`images` cannot be decompressed \(.*\): the file is damaged; write it again"),
    ("labels", r"cannot read the .npz \(.*\)"),
    ("class_names", r"cannot read the .npz \(.*\)"),
])
@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_damaged_compressed_members_are_a_data_error(tmp_path, member, problem, where):
    """A flipped byte in a compressed member: zipfile's BadZipFile, zlib.error or EOFError, depending on the
    byte. The images' surfaces only when the cache build decompresses them; each is a DataError naming the file."""
    path = tmp_path / "d.npz"
    np.savez_compressed(path, images=random_images(40, 20, 20), labels=np.arange(40) % 3,
                        class_names=np.array(["ant", "bee", "cow"]))
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member + ".npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + int(info.compress_size * where)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"d.npz: {problem}"):
        open_npz(path, RGB16, tmp_path / "cache")


def test_a_very_thin_image_is_cropped_before_it_is_scaled_up(tmp_path, monkeypatch):
    """A 400x10 strip was scaled to 640x16 before the 16x16 centre crop (a 400000x1 PNG of 1 kB took 8 GB at
    size 64): a longer side beyond MAX_ASPECT times the shorter is cropped around the centre first."""
    strip = np.zeros((10, 400, 3), np.uint8)
    strip[:, 160:240] = 255   # white around the centre, black elsewhere
    Image.fromarray(strip).save(tmp_path / "strip.png")
    asked = []
    resize = Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        asked.append(size[0] * size[1])
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    out = load_image(tmp_path / "strip.png", 16, 3)
    assert max(asked) <= MAX_ASPECT * 16 * 16 and (out == 255).all()
    Image.fromarray(strip[:, :80]).save(tmp_path / "wide.png")   # 8:1, not cropped: scaled to 128x16
    load_image(tmp_path / "wide.png", 16, 3)
    assert asked[-1] == 128 * 16


def test_an_npz_is_checked_against_the_config_before_its_cache_is_built(tmp_path):
    """A compressed .npz of 3-channel images for a 1-channel config was decompressed and resized in full (hours
    for a large one), then refused, its cache left behind."""
    path = tmp_path / "d.npz"
    np.savez_compressed(path, images=random_images(10, 20, 20), labels=np.arange(10))
    reports = []
    with pytest.raises(DataError, match="d.npz: the images have 3 channel"):
        open_npz(path, ECARConfig.preset("ecar-tiny"), tmp_path / "cache", report=lambda *a: reports.append(a))
    assert reports == [] and not list((tmp_path / "cache").glob("*.npy"))


def test_a_compressed_npz_is_decompressed_in_chunks_of_bounded_bytes(tmp_path, monkeypatch):
    """Its cache build read CACHE_CHUNK (1024) rows at once whatever their size: 50 GB for 4096x4096 images."""
    path = tmp_path / "d.npz"
    images = random_images(5, 20, 20)
    np.savez_compressed(path, images=images, labels=np.arange(5) % 3)
    monkeypatch.setattr(data_module, "CHUNK_BYTES", 2 * images[0].nbytes + 1)
    reports = []
    data = open_npz(path, RGB16, tmp_path / "cache", report=lambda done, total: reports.append(done))
    assert reports == [2, 4, 5]
    assert np.array_equal(data.pixels, data_module.resize_array(images, 16))


def test_an_npz_of_images_too_large_to_decode_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, images=random_images(3, 16, 16), labels=np.arange(3))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # refused above 200 pixels: 256 is
    with pytest.raises(DataError, match=r"d.npz: images of 16x16 pixels are too large to decode \(more than 200 pixels\)"):
        open_npz(path, RGB16, tmp_path / "cache")


def test_npz_channel_mismatch_and_malformed_files(tmp_path):
    gray = tmp_path / "gray.npz"
    np.savez(gray, images=random_images(3, 16, 16, c=1), labels=np.arange(3))
    with pytest.raises(DataError, match="gray.npz: the images have 1 channel.*latent_channels=3.*--set latent_channels=1"):
        open_npz(gray, RGB16, tmp_path / "cache")
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((3, 16, 16, 3), np.float32), labels=np.arange(3))
    with pytest.raises(DataError, match=r"floats.npz: `images` must be uint8"):
        open_npz(floats, RGB16, tmp_path / "cache")
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, x=np.zeros(3))
    with pytest.raises(DataError, match="nolabels.npz: an .npz data set needs `images`"):
        open_npz(nolabels, RGB16, tmp_path / "cache")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"garbage")   # numpy read it as a pickle, and the error suggested allow_pickle
    with pytest.raises(DataError, match=r"garbage.npz: not an .npz file \(not a zip archive\); write the data set "
                                        r"with np.savez"):
        open_npz(garbage, RGB16, tmp_path / "cache")
    # object arrays (pickles) are never loaded: they were called truncated or damaged
    objects = np.empty((3, 16, 16, 3), dtype=object)
    objects[...] = 0
    for member, arrays in (("images", dict(images=objects, labels=np.arange(3))),
                           ("labels", dict(images=random_images(3, 16, 16), labels=np.arange(3).astype(object)))):
        np.savez(tmp_path / "objects.npz", **arrays)
        with pytest.raises(DataError, match=rf"objects.npz: `{member}` holds Python objects \(object\), which a data "
                                            rf"set never loads; save it as a numeric array"):
            open_npz(tmp_path / "objects.npz", RGB16, tmp_path / "cache")


def test_open_data_dispatch_and_errors(tmp_path):
    digits = open_data("digits32", ECARConfig.preset("ecar-tiny"), tmp_path, train_size=20)
    assert len(digits) == 20 and digits.images([0]).shape == (1, 1, 16, 16)
    with pytest.raises(DataError, match="not found"):
        open_data(str(tmp_path / "missing.npz"), RGB16, tmp_path)
    (tmp_path / "README.md").write_text("# notes")
    with pytest.raises(DataError, match=r"--data .*README.md: a file that is not an .npz; give digits32, an .npz "
                                        r"file or an image folder \(one sub-folder per class\)"):
        open_data(str(tmp_path / "README.md"), RGB16, tmp_path)
    upper = tmp_path / "UPPER.NPZ"
    with open(upper, "wb") as f:   # np.savez would add .npz to the name
        np.savez(f, images=random_images(3, 16, 16), labels=np.arange(3))
    assert len(open_data(str(upper), RGB16, tmp_path / "cache")) == 3
    with pytest.raises(DataError, match="--train-size applies to digits32 only"):
        open_data(str(tmp_path), RGB16, tmp_path, train_size=3)
