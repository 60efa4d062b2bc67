"""digits32: 32x32 grayscale digit glyphs rendered from the open-licensed fonts that ship with matplotlib.

Source: the TrueType fonts in matplotlib's mpl-data/fonts/ttf (DejaVu Sans, Sans Mono and Serif under
the Bitstream Vera / DejaVu licence; STIX General under the SIL Open Font License 1.1; Computer Modern
(BaKoMa) under its own free licence). Each sample is one digit 0-9 in one font and style, drawn at 4x
resolution with a random stroke thickening, rotation, shear, scale and shift, then box-downsampled to
32x32 (anti-aliased). White glyph on black, as float32 in [-1, 1].

The build is deterministic (seeded numpy RNG) and takes seconds. The "train" and "heldout" splits
use the same fonts with independent random draws (different seeds), so no held-out image is a training
image. `python -m ecar_infer.training.digits --out digits32.npz` writes both splits to a file.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 32
RENDER_SCALE = 4                      # glyphs are drawn at 4x and box-downsampled
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf",
)
SPLIT_SEEDS = {"train": 0, "heldout": 1}
DEFAULT_SIZES = {"train": 20000, "heldout": 2000}


@dataclass(frozen=True)
class Augment:
    """Ranges of the random affine and stroke augmentation (angles in degrees, shift in output pixels)."""

    rotate: float = 12.0
    shear: float = 0.25
    scale: tuple[float, float] = (0.70, 1.0)
    shift: float = 3.0
    max_stroke: int = 3               # extra stroke width at the 4x render size, 0..max_stroke


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=None)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_dir() / name), size)


@lru_cache(maxsize=None)
def _glyph_canvas(digit: int, font_name: str, stroke: int, big: int):
    """(canvas, ink height): the glyph drawn for a [big, big] render, its ink box centred on a [2*big, 2*big] canvas."""
    from PIL import Image, ImageDraw

    font = _font(font_name, int(big * 0.75))
    text = str(digit)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    origin = (big - (left + right) / 2, big - (top + bottom) / 2)
    ImageDraw.Draw(canvas).text(origin, text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return canvas, bottom - top


def render_digit(digit: int, font_name: str, rng: np.random.Generator, image_size: int = IMAGE_SIZE,
                 aug: Augment = Augment()) -> np.ndarray:
    """One augmented glyph: [image_size, image_size] float32 in [0, 1] (1 = ink)."""
    from PIL import Image

    big = image_size * RENDER_SCALE
    canvas, glyph_height = _glyph_canvas(digit, font_name, int(rng.integers(0, aug.max_stroke + 1)), big)
    # output pixel (u, v) around the output centre -> canvas pixel: inverse of scale * shear * rotation
    scale = rng.uniform(*aug.scale) * (0.8 * big) / glyph_height
    angle = math.radians(rng.uniform(-aug.rotate, aug.rotate))
    shear = rng.uniform(-aug.shear, aug.shear)
    forward = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = forward @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    shift = rng.uniform(-aug.shift, aug.shift, size=2) * big / IMAGE_SIZE
    out_centre = np.array([big / 2, big / 2]) + shift
    offset = np.array([big, big]) - inverse @ out_centre
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    warped = canvas.transform((big, big), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    small = warped.resize((image_size, image_size), resample=Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def build_split(split: str, size: int | None = None, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, image_size, image_size] float32 in [-1, 1], labels [N] int64), balanced over digits
    and fonts. The first k images of a split do not depend on its size. Other image sizes (e.g. 16 for
    tests) scale the whole drawing, so they are the same glyphs at another resolution."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    size = DEFAULT_SIZES[split] if size is None else size
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    labels = np.arange(size) % NUM_CLASSES
    fonts = (np.arange(size) // NUM_CLASSES) % len(FONT_FILES)
    images = np.stack([render_digit(int(y), FONT_FILES[f], rng, image_size) for y, f in zip(labels, fonts)])
    return (images[:, None] * 2.0 - 1.0).astype(np.float32), labels.astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the digits32 data set (train and held-out splits).")
    parser.add_argument("--out", default="digits32.npz", help="output .npz file")
    parser.add_argument("--train-size", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--heldout-size", type=int, default=DEFAULT_SIZES["heldout"])
    args = parser.parse_args(argv)
    x_train, y_train = build_split("train", args.train_size)
    x_held, y_held = build_split("heldout", args.heldout_size)
    np.savez_compressed(args.out, x_train=x_train, y_train=y_train, x_heldout=x_held, y_heldout=y_held)
    print(f"wrote {args.out}: train {x_train.shape}, heldout {x_held.shape}")


if __name__ == "__main__":
    main()
