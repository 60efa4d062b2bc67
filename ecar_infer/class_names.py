"""Class names that travel with a model: the checkpoint metadata entry `class_names` (a JSON list of
one string per class, written by ecar-train), resolving a user's class by index or name, and labelling
the rows of an image grid."""
from __future__ import annotations

import functools
import json
import unicodedata
from typing import TYPE_CHECKING

from .checks import parse_json, some_of

if TYPE_CHECKING:
    import numpy as np

METADATA_KEY = "class_names"
MAX_NAME_CHARS = 1024   # the class_names entry's bound per class (JSON quotes and escapes included)


def match_key(name: str) -> str:
    """What names are compared by: case folded and Unicode-normalised (NFKC), so that "CAFÉ" typed with a
    combining accent, or a fullwidth letter, finds "café" (Unicode's compatibility caseless match)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


class ClassNameError(ValueError):
    """A class the model does not have, or a malformed class_names entry; the message lists the classes."""


def parse_class_names(text: str | None, num_classes: int) -> list[str] | None:
    """The class names of a checkpoint's metadata entry (None when it has none)."""
    if text is None:
        return None
    if isinstance(text, str) and len(text) > MAX_NAME_CHARS * num_classes:   # before JSON takes ~30x its size
        raise ClassNameError(f"{METADATA_KEY} is {len(text):,} characters: more than {MAX_NAME_CHARS:,} for each "
                             f"of the {num_classes} classes")
    try:
        names = parse_json(text)
    except (TypeError, ValueError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ClassNameError(f"{METADATA_KEY} must be a JSON list of non-empty strings")
    if len(names) != num_classes:
        raise ClassNameError(f"{METADATA_KEY} has {len(names)} names for {num_classes} classes")
    # a newline or tab in a name (a folder may be called so) would break one-line errors and the grid labels;
    # Unicode's line and paragraph separators (Zl, Zp) break lines as well
    controlled = next((n for n in names if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in n)), None)
    if controlled is not None:
        raise ClassNameError(f"{METADATA_KEY} has a name with a control character (a newline, a tab): "
                             f"{controlled!r}")
    first_of = {}
    for name in names:
        if match_key(name) in first_of:
            raise ClassNameError(f"{METADATA_KEY} has names that differ only in case or Unicode form "
                                 f"({first_of[match_key(name)]!r} and {name!r}), or repeat")
        first_of[match_key(name)] = name
    return names


def encode_class_names(names: list[str], num_classes: int) -> str:
    """The metadata entry for `names` (checked as parse_class_names checks it)."""
    text = json.dumps(list(names))
    parse_class_names(text, num_classes)
    return text


def list_classes(names: list[str] | None, num_classes: int, limit: int = 50) -> str:
    """'0 Smileys & Emotion, 1 People & Body, ...' (or the index range of a model without names)."""
    if not names:
        return f"indices 0-{num_classes - 1} (this model has no class names)"
    return some_of([f"{i} {n}" for i, n in enumerate(names)], limit)


def resolve_class(text: str, names: list[str] | None, num_classes: int) -> int:
    """A class index from a name, exact (by match_key: case and Unicode form ignored), else an index ('3'),
    else an unambiguous prefix of a name. A name comes first, so that classes named by digits ("2", "3d") are
    found by name."""
    text = text.strip()
    if not text:
        raise ClassNameError(f"an empty class name; the classes are {list_classes(names, num_classes)}")
    key = match_key(text)
    exact = [i for i, n in enumerate(names or []) if match_key(n) == key]
    if exact:
        return exact[0]
    if text.isdecimal():  # what int() reads ('²' is a digit but no number)
        index = int(text)
        if index < num_classes:
            return index
        raise ClassNameError(f"class {index} is outside this model's classes: {list_classes(names, num_classes)}")
    if not names:
        raise ClassNameError(f"class {text!r}: this model has no class names; give an index 0-{num_classes - 1}")
    matches = [i for i, n in enumerate(names) if match_key(n).startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ClassNameError(f"class {text!r} is ambiguous: it begins {', '.join(names[i] for i in matches)}")
    raise ClassNameError(f"no class {text!r}; the classes are {list_classes(names, num_classes)}")


def label_rows(grid: np.ndarray, labels: list[str], row_height: int, pad: int = 2) -> np.ndarray:
    """A uint8 [H, W, C] grid with a white margin on the left holding one text label per row of
    images (rows of `row_height` pixels separated by `pad`)."""
    from PIL import Image, ImageDraw

    drawn = [drawable(label) for label in labels]
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    margin = max(int(measure.textlength(text, font=font)) for text, font in drawn) + 2 * pad
    h, w, c = grid.shape
    canvas = Image.new("RGB", (margin + w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB"), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (text, font) in enumerate(drawn):
        top = r * (row_height + pad)
        draw.text((pad, top + row_height // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    import numpy as np

    out = np.asarray(canvas)
    return out[..., :1] if c == 1 else out


# Pillow's default font draws ASCII only: "café" came out "caf" and a box. A system font of wide coverage,
# where one is installed (most Linux systems have DejaVu), draws what it can.
WIDE_FONTS = ("DejaVuSans.ttf",)


def drawable(label: str):
    """(text, font): the label in the first font that has all its glyphs; else in the default font with its
    accents dropped (NFKD) and any character still missing drawn as "?" (no font here has CJK or emoji)."""
    fonts = _fonts()
    for font in fonts:
        if all(_has_glyph(font, ch) for ch in label):
            return label, font
    plain = "".join(ch for ch in unicodedata.normalize("NFKD", label) if not unicodedata.combining(ch))
    return "".join(ch if _has_glyph(fonts[0], ch) else "?" for ch in plain), fonts[0]


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple:
    """Pillow's default font, then each of WIDE_FONTS found on the system, at the default's size."""
    from PIL import ImageFont

    default = ImageFont.load_default()
    fonts = [default]
    for name in WIDE_FONTS:
        try:
            fonts.append(ImageFont.truetype(name, _size(default)))
        except (OSError, ImportError):   # not installed, or Pillow built without FreeType
            pass
    return tuple(fonts)


def _size(font) -> int:
    return getattr(font, "size", 11)   # a bitmap font (Pillow built without FreeType) has no size: 11 px tall


@functools.lru_cache(maxsize=8192)   # a grid of ImageNet's 1,000 labelled classes drew 40,000 glyphs: 1.7 s
def _has_glyph(font, ch: str) -> bool:
    """Whether `font` draws `ch` as itself rather than as its missing-glyph box."""
    from PIL import ImageFont

    if not isinstance(font, ImageFont.FreeTypeFont):   # Pillow's bitmap font (no FreeType): printable ASCII
        return ch.isascii() and ch.isprintable()
    return _glyph(font, ch) != _glyph(font, "\ue000")   # U+E000: private use, in no font here


def _glyph(font, ch: str) -> bytes:
    from PIL import Image, ImageDraw

    size = _size(font)
    image = Image.new("L", (4 * size, 2 * size))
    ImageDraw.Draw(image).text((size, size // 2), ch, fill=255, font=font)
    return image.tobytes()
