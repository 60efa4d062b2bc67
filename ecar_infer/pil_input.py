"""PIL images as the models read them: 8 bits per channel, opaque, in the model's channels.

One rule for every image a user gives (an image to edit, a training image): the EXIF orientation is
applied (a phone photo stored sideways is read upright, as viewers show it); transparency (RGBA, LA, PA,
a palette or an L or RGB image with a transparent colour) is composited on white, as the emoji data set
is; 16-bit grayscale
(mode I;16, what Pillow opens a 16-bit PNG or TIFF as, and mode I of a 16-bit PGM, which Pillow scales to
0..65535 whatever its maximum) is scaled to 8 bits (Pillow's own conversion would clip every value above
255 to white); a 32-bit image (mode I or F, as scientific tools write TIFFs) is read by its values' range:
integers up to 255 as 8 bits, up to 65535 as 16 bits, floats in [0, 1] as intensities, floats up to 255 as 8
bits, and any other range is refused (its scale cannot be known; Pillow clipped it silently); then L for
1-channel models, RGB for 3-channel ones.

Images of another size are brought to the model's by one rule too (resize_center_crop): training reads
every image so, and `ecar-edit --fit` brings an image to edit so. (A mask image is read by these rules as
well, but one with transparent pixels is refused first: ecar_infer/editing.py.)
"""
from __future__ import annotations

import math
import warnings

import numpy as np

MAX_ASPECT = 8   # a longer side beyond this many times the shorter is cropped first (resize_center_crop)
CHUNK_PIXELS = 1 << 22   # a 16- or 32-bit image is scaled to 8 bits this many pixels at a time


class ImageTooLarge(ValueError):
    """An image past Pillow's decompression-bomb bound (2 x Image.MAX_IMAGE_PIXELS pixels)."""


def open_image(path):
    """Image.open (the header only; pixels are decoded on load()), raising OSError or ValueError for a file
    that cannot be used: Pillow's error for a decompression bomb (a small file that decodes into gigabytes)
    is neither, and is ImageTooLarge here; its two-line warning below that bound is silenced."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"too large to decode: {err}") from None


def as_model_image(image, channels: int):
    """A PIL image in mode L (channels 1) or RGB (channels 3), by the rules above (the caller's image is not
    changed)."""
    from PIL import Image

    turn = _orientation_fix(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PPM"):
        image = _gray8(image, 1 / 257.0)  # 65535 -> 255
    elif image.mode in ("I", "F"):
        image = _gray8(image, _to_8_bit_scale(image))
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:   # a PNG's tRNS colour key
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("L" if channels == 1 else "RGB")   # a copy, even in the same mode
    image = image.transpose(turn) if turn is not None else image
    # the rules are applied: the result carries none of the file's metadata (its EXIF orientation above all),
    # so that reading it again, as ecar-edit --fit's fitted image is read by edit(), changes nothing
    image.info = {}
    return image


def _tiles(image):
    """(top, left, values as float64) of a 16- or 32-bit PIL image, at most CHUNK_PIXELS at a time (whole rows,
    or pieces of a row wider than that): the image whole as float64 and its temporaries took 9-17 bytes a pixel,
    3 GB at Pillow's largest size (2 x 89M pixels)."""
    width, height = image.size
    rows, columns = max(1, CHUNK_PIXELS // max(width, 1)), max(1, min(width, CHUNK_PIXELS))   # 1: no pixels
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            box = (left, top, min(left + columns, width), min(top + rows, height))
            yield top, left, np.asarray(image.crop(box)).astype(np.float64)


def _gray8(image, scale: float):
    """The mode-L image of a 16- or 32-bit image's values times `scale` (0..255 after it), rounded."""
    from PIL import Image

    out = np.empty((image.size[1], image.size[0]), np.uint8)
    for top, left, values in _tiles(image):
        out[top:top + values.shape[0], left:left + values.shape[1]] = np.round(values * scale)
    return Image.fromarray(out, "L")


def _to_8_bit_scale(image) -> float:
    """What a 32-bit image's values are multiplied by to lie on the 0..255 scale, by their range (the rules
    above); a ValueError otherwise."""
    low, high, mode = math.inf, -math.inf, image.mode
    for _, _, values in _tiles(image):
        if not np.isfinite(values).all():
            raise ValueError(f"a 32-bit image (mode {mode}) with NaN or infinite values")
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    if low >= 0 and mode == "F" and high <= 1:
        return 255.0
    if low >= 0 and high <= 255:
        return 1.0
    if low >= 0 and mode == "I" and high <= 65535:
        return 1 / 257.0
    raise ValueError(f"a 32-bit image (mode {mode}) with values from {low:g} to {high:g}: its scale cannot be "
                     f"known; convert it to 8 or 16 bits first")


def upright_size(image) -> tuple[int, int]:
    """(width, height) of `image` as as_model_image reads it: its stored size, turned a quarter where its EXIF
    orientation does so."""
    from PIL import Image

    quarter_turns = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                     Image.Transpose.ROTATE_90)
    width, height = image.size
    return (height, width) if _orientation_fix(image) in quarter_turns else (width, height)


def _orientation_fix(image):
    """The transpose that shows `image` upright by its EXIF orientation tag (None for none, 1, or an EXIF
    block too malformed to read, which is ignored: the pixels are still good). Taken from the image as given,
    before any conversion drops the tag (a TIFF keeps it outside the EXIF bytes a copy carries)."""
    from PIL import Image

    try:
        orientation = image.getexif().get(0x0112, 1)   # EXIF tag 274, Orientation
    except Exception:   # noqa: BLE001  (Pillow raises many types on malformed EXIF; none should cost the image)
        return None
    return {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}.get(orientation)


def resize_center_crop(image, size: int):
    """The ADM / DiT rule: box-halve while the shorter side is >= 2*size, bicubic to a shorter side of
    `size`, centre crop. A PIL image in, a PIL image of size x size out. An image more than MAX_ASPECT times
    as long as it is wide is first cropped to MAX_ASPECT around its centre: the final crop keeps only the
    centre anyway, and a 400000x1 strip would otherwise be scaled up to gigabytes."""
    from PIL import Image

    short, long = sorted(image.size)
    if long > MAX_ASPECT * short:
        keep = MAX_ASPECT * short
        start = (long - keep) // 2
        image = image.crop((start, 0, start + keep, short) if image.size[0] > image.size[1]
                           else (0, start, short, start + keep))
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))
