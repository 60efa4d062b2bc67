"""Training data for ecar-train: an image folder, an .npz of uint8 images, or the built-in digits32.

    --data digits32    the built-in digit glyphs (ecar_infer/training/digits.py)
    --data FILE.npz    `images` uint8 [N, H, W, C], `labels` integers [N], optional `class_names` strings [K]
                       (`arr_0` for `images`, as in the ADM evaluator's files and `ecar-sample --npz`'s)
    --data DIR         the ImageFolder layout: one sub-folder per class, classes sorted by folder name,
                       the folder names are the class names

Images are brought to the config's size S by the ADM / DiT rule: while the shorter side is at least 2S,
halve the image with a box filter; then resize bicubically so the shorter side is S; then crop the
centre S x S. Images are read as ecar_infer/pil_input.py reads every user image (EXIF orientation applied,
transparency composited on white, 16-bit grayscale scaled to 8 bits, 32-bit images read by their range). A
folder gives RGB to a 3-channel config
(grayscale images are replicated into the three channels, as the sampler shows a 1-channel model's
images) and grayscale to a 1-channel config, which refuses a folder holding color images.

Nothing holds the whole data set in memory: an uncompressed .npz at the right size is memory-mapped in
place; an image folder, a compressed .npz or one of another size is converted once into a uint8
memory-mapped cache file (ecar_infer/training/diskcache.py: resumable, shared by the ranks). Unreadable
images stop that build, before training starts: every file that cannot be opened as an image is named
before any decoding, and an image that fails to decode (a truncated file) when the build reaches it, with
every other such file of the folder, found by decoding the rest (at most MAX_NAMED names, and a count); the
failed build is deleted, since mending the files changes the cache's key. Training reads only the rows it
draws.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checks import some_of
from ..class_names import MAX_NAME_CHARS, ClassNameError, encode_class_names
from ..config import ECARConfig
from ..output import npy_header, npz_member_header
from ..pil_input import as_model_image, open_image, resize_center_crop
from .diskcache import cached_array, is_cached

DIGITS32 = "digits32"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
CACHE_CHUNK = 1024   # images decoded per step of the cache build (and per progress record)
POOL_SLICE = 4096    # files handed to the decoding threads at a time (each pending one costs memory)
DECODE_RULES = 2     # in an image folder cache's key: raised when the decoding rules change (pil_input.py;
                     # 2: EXIF orientation, colour-key transparency, 32-bit images by their range), so that no
                     # cache of the old rules is used
CHUNK_BYTES = 256 * 2**20   # at most this much of a compressed .npz decompressed per step of its cache build
MAX_NAMED = 20       # files or classes an error names (then a count of the rest)
IDENTITY_ROWS = 64   # images hashed by ImageSet.identity (all of them would take minutes on a large set)
GRAY_BANDS = {"1", "L", "I", "F", "A"}   # PIL bands of grayscale images (with or without alpha)


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and what to do."""


# ---- one image ---------------------------------------------------------------------------------------
def class_counts(class_names: list[str], labels, limit: int = 20) -> str:
    """'cat: 120 images, dog: 98, ...' for the first `limit` classes, then a count of the rest."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    return some_of([f"{name}: {count:,}" + (" images" if k == 0 else "")
                    for k, (name, count) in enumerate(zip(class_names, counts))], limit)


def _unreadable(failures: list[tuple[Path, Exception]]) -> DataError:
    """The error of image files PIL cannot read: (path, PIL's error) pairs."""
    if len(failures) == 1:
        path, err = failures[0]
        return DataError(f"{path}: cannot read the image ({err}); remove or replace the file")
    named = some_of([f"{p} ({e})" for p, e in failures], MAX_NAMED)
    return DataError(f"{len(failures)} images cannot be read: {named}; remove or replace them")


def _decode_image(path: str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """load_image, raising OSError or ValueError for an unreadable file (pil_input.open_image)."""
    with open_image(path) as image:
        image.load()
        image = as_model_image(image, channels)
    array = np.asarray(resize_center_crop(image, size), dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def load_image(path: str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """uint8 [size, size, channels] (channels 1 or 3) from an image file, by the rules above."""
    try:
        return _decode_image(path, size, channels)
    except (OSError, ValueError) as err:   # PIL's UnidentifiedImageError is an OSError
        raise _unreadable([(Path(path), err)]) from None


def _open_header(path: Path) -> None:
    """Read an image file's header only (cheap): fails on a file that is not an image at all."""
    with open_image(path):
        pass


def _is_color(path: Path) -> bool:
    """Whether an image file holds color, from its header: a palette image is color if any entry of its palette
    is (a grayscale GIF or PNG-8 has a palette of grays)."""
    with open_image(path) as image:
        if set(image.getbands()) <= GRAY_BANDS:
            return False
        if image.mode in ("P", "PA"):
            palette = image.getpalette("RGB") or []
            return any(not r == g == b for r, g, b in zip(palette[0::3], palette[1::3], palette[2::3]))
        return True


def _attempt_each(fn, files: list[Path], workers: int,
                  done: Callable[[int], None] | None = None) -> tuple[list, list[tuple[Path, Exception]]]:
    """(fn(file) or its error for each file, the (file, error) pairs of the failures), on a thread pool (PIL
    releases the GIL while decoding and resizing), submitted POOL_SLICE files at a time: a pool given all
    1.28M files of ImageNet at once held a pending task of 1.65 kB for each, 2 GB. done(n): after each slice,
    the files attempted so far."""
    def attempt(path: Path):
        try:
            return fn(path)
        except (OSError, ValueError) as err:
            return err

    results = []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), POOL_SLICE):
            results += pool.map(attempt, files[start:start + POOL_SLICE])
            if done:
                done(len(results))
    return results, [(f, r) for f, r in zip(files, results) if isinstance(r, Exception)]


def _each_image(fn, files: list[Path], workers: int) -> list:
    """fn(file) for each file (_attempt_each); one DataError names every file fn fails on."""
    results, failures = _attempt_each(fn, files, workers)
    if failures:
        raise _unreadable(failures)
    return results


def resize_array(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, C] (C 1 or 3) -> uint8 [N, size, size, C] by the rule above."""
    from PIL import Image

    if pixels.shape[1:3] == (size, size):
        return np.asarray(pixels)
    c = pixels.shape[-1]
    out = [np.asarray(resize_center_crop(Image.fromarray(p[..., 0] if c == 1 else p), size)) for p in pixels]
    return np.stack(out).reshape(len(pixels), size, size, c)


# ---- a data set --------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Images at the model's size with their labels: `pixels` is uint8 [N, S, S, C] (memory-mapped) or,
    for digits32, float32 [N, C, S, S] in [-1, 1]; labels int64 [N]; one name per class."""

    pixels: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    description: str
    fingerprint: str = ""   # identifies the content (what caches built from it are keyed by)

    @classmethod
    def undecoded(cls, labels: np.ndarray, class_names: list[str], description: str, channels: int) -> "ImageSet":
        """A set whose pixels are not decoded yet (no rows of 0x0 images): what check() needs, before the
        hours of decoding that fill `pixels`."""
        return cls(np.zeros((len(labels), 0, 0, channels), np.uint8), labels, class_names, description)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.pixels.shape[1] if self.pixels.dtype == np.float32 else self.pixels.shape[-1]

    @property
    def size(self) -> int:
        return self.pixels.shape[2] if self.pixels.dtype == np.float32 else self.pixels.shape[1]

    def identity(self) -> dict:
        """What the data set holds, cheaply: its class names, image count and a hash of the labels and of
        IDENTITY_ROWS evenly spaced images (not its path: the same data moved is the same data)."""
        rows = np.unique(np.linspace(0, len(self) - 1, min(len(self), IDENTITY_ROWS)).round().astype(np.int64))
        content = hashlib.sha256(np.asarray(self.labels, dtype=np.int64).tobytes())
        content.update(np.ascontiguousarray(self.pixels[rows]).tobytes())
        return {"class_names": self.class_names, "images": len(self), "sha256": content.hexdigest()}

    def images(self, index) -> torch.Tensor:
        """float32 [B, C, S, S] in [-1, 1] of the rows `index` (only those rows are read)."""
        rows = np.asarray(self.pixels[np.asarray(index)])
        if rows.dtype == np.float32:
            return torch.from_numpy(rows)
        return torch.from_numpy(rows).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def check(self, config: ECARConfig, channels: int | None = None) -> None:
        """Fail early if the data cannot train `config` (channels: the images the model sees; for a
        latent model, the VAE's input channels)."""
        want = channels or config.latent_channels
        if self.channels != want:
            if channels:
                raise DataError(f"{self.description}: the images have {self.channels} channel(s) but the VAE "
                                f"takes {want}; convert the images")
            raise DataError(f"{self.description}: the images have {self.channels} channel(s) but the config has "
                            f"latent_channels={want}; use a config that matches the data (--set "
                            f"latent_channels={self.channels}) or convert the images")
        if len(self.class_names) != config.num_classes:
            found = class_counts(self.class_names, self.labels)
            raise DataError(f"{self.description}: {len(self.class_names)} classes ({found}) but the "
                            f"config has num_classes={config.num_classes}; use --set "
                            f"num_classes={len(self.class_names)}, or point --data at the folder whose sub-folders "
                            f"are the classes")
        try:   # the names must make a valid checkpoint entry: found now, not at the first checkpoint
            encode_class_names(self.class_names, config.num_classes)
        except ClassNameError as err:
            raise DataError(f"{self.description}: {err}; give each class a distinct, non-empty, one-line "
                            f"name") from None
        if not len(self):
            raise DataError(f"{self.description}: no images")


def _check_labels(labels: np.ndarray, class_names: list[str], where: str, images: int) -> np.ndarray:
    """The labels as int64, one per image, each one a class of `class_names` and every class with at least one
    image."""
    num_classes = len(class_names)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
    if len(labels) != images:
        raise DataError(f"{where}: {images} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        advice = ("labels count the classes from 0" if labels.min() < 0 else
                  f"give `class_names` one name per class, or leave it out and --set "
                  f"num_classes={int(labels.max()) + 1}")
        raise DataError(f"{where}: label {labels[bad[0]]} of image {bad[0]} is outside the classes "
                        f"0-{num_classes - 1} ({len(bad)} such label(s)); {advice}")
    empty = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
    if len(empty):
        named = [str(i) if class_names[i] == str(i) else f"{i} ({class_names[i]})" for i in empty]
        raise DataError(f"{where}: no images of class(es) {some_of(named, MAX_NAMED)} of the {num_classes} classes; "
                        f"add images of them, or leave them out (renumber the labels, drop their `class_names` or lower "
                        f"--set num_classes)")
    return labels.astype(np.int64)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(path: Path) -> tuple[int, int]:
    """(byte size, modification time in ns) of a file: what tells a cache that the file changed (an image
    rewritten in place at the same size, as BMP and PPM files are, changes only its time)."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


# ---- .npz ------------------------------------------------------------------------------------------
def _member_header(path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The .npy header of the member `name` of an .npz; a DataError if it holds Python objects or describes
    more bytes than it holds (a damaged file: numpy would ask for all of them from memory before reading any)."""
    try:
        shape, fortran, dtype = npz_member_header(path, name)
    except ValueError as err:
        raise DataError(f"{path}: {err}: the file is truncated or damaged; write it again") from None
    if dtype.hasobject:   # pickled Python objects, which are never loaded (their size says nothing either)
        raise DataError(f"{path}: `{name}` holds Python objects ({dtype}), which a data set never loads; save it as "
                        f"a numeric array (np.asarray(..., dtype=np.uint8) for images, integers for labels)")
    return shape, fortran, dtype


def _npz_member_memmap(path: Path, name: str) -> np.ndarray | None:
    """The member `name`.npy of an .npz memory-mapped in place, or None if it is compressed."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)   # the local file header: its name and extra field lengths are at 26 and 28
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        shape, fortran, dtype = npy_header(f)
        offset = f.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _check_small_member(path: Path, name: str, images: int) -> None:
    """`labels` (one per image) and `class_names` (at most one per image) bounded from their headers by the
    image count, before they are loaded: a zip bomb of a few MB declaring billions of labels was loaded whole.
    Their form is checked once loaded."""
    shape, _, dtype = _member_header(path, name)
    if name == "labels" and math.prod(shape) > images:
        raise DataError(f"{path}: {images} images but `labels` of shape {list(shape)}: give one label per image")
    if name == "class_names" and (math.prod(shape) > images or dtype.itemsize > 4 * MAX_NAME_CHARS):
        raise DataError(f"{path}: `class_names` of {dtype} {list(shape)} for {images} images: give a 1-D array of "
                        f"one name per class, each of at most {MAX_NAME_CHARS:,} characters")


class _CompressedRows:
    """The rows of a compressed .npz member, decompressed as they are read: rows[a:b] for increasing a
    (what a cache build asks for), so the whole array is never in memory."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.shape, fortran, self.dtype = _member_header(path, name)
        if fortran or len(self.shape) != 4:
            raise DataError(f"{path}: `{name}` must be a C-ordered [N, H, W, C] array")
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        self._stream, self._row = None, 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(len(self))
        try:
            if self._stream is None or a < self._row:   # (re)open at the start of the member
                self._archive = zipfile.ZipFile(self.path)
                self._stream = self._archive.open(self.name + ".npy")
                npy_header(self._stream)
                self._row = 0
            while self._row < a:   # skip rows a resumed build has already done
                self._stream.read(self.row_bytes)
                self._row += 1
            data = self._stream.read(self.row_bytes * (b - a))
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:   # damaged compressed data (a bad CRC-32)
            raise DataError(f"{self.path}: `{self.name}` cannot be decompressed ({err}): the file is damaged; "
                            f"write it again") from None
        if len(data) != self.row_bytes * (b - a):
            raise DataError(f"{self.path}: `{self.name}` ends before its image {a + len(data) // self.row_bytes}: the "
                            f"file is truncated or damaged; write it again")
        self._row = b
        return np.frombuffer(data, self.dtype).reshape((b - a,) + self.shape[1:])


def _class_names(names: np.ndarray, path: Path) -> list[str]:
    """The `class_names` of an .npz data set: a 1-D array of strings."""
    if names.ndim != 1 or names.dtype.kind != "U":
        raise DataError(f"{path}: `class_names` must be a 1-D array of strings (np.array(names)), got "
                        f"{names.dtype} {list(names.shape)}")
    return names.tolist()


def open_npz(path: str | os.PathLike, config: ECARConfig, cache_dir: str | os.PathLike,
             channels: int | None = None, report: Callable[[int, int], None] | None = None) -> ImageSet:
    """An .npz data set (see the module docstring) at the config's size; report(done, total) after each
    chunk of a cache build (resizing)."""
    path = Path(path)
    size = config.image_size
    with open(path, "rb") as f:   # opened here: an unreadable file is an OSError, not "no zip archive"
        is_zip = zipfile.is_zipfile(f)
    if not is_zip:   # else numpy reads it as a pickle, and suggests allow_pickle
        raise DataError(f"{path}: not an .npz file (not a zip archive); write the data set with np.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            member = "images" if "images" in names else "arr_0"   # arr_0: the ADM evaluator's layout
            if not {member, "labels"} <= names:
                raise DataError(f"{path}: an .npz data set needs `images` (uint8 [N, H, W, C], or `arr_0`) and "
                                f"`labels` ([N] integers); it has {sorted(names)}")
            images = _npz_member_memmap(path, member)
            if images is None:   # compressed: decompressed row by row into the cache below
                images = _CompressedRows(path, member)
            for small in {"labels", "class_names"} & names:   # before numpy allocates what they describe
                _check_small_member(path, small, images.shape[0] if images.shape else 0)
            labels = np.asarray(f["labels"])
            class_names = _class_names(f["class_names"], path) if "class_names" in names else None
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError, zlib.error) as err:   # the last two: a
        if isinstance(err, DataError):                                                      # damaged compressed member
            raise
        raise DataError(f"{path}: cannot read the .npz ({err})") from None
    if (images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] not in (1, 3)
            or 0 in images.shape[1:3]):
        raise DataError(f"{path}: `images` must be uint8 [N, H, W, C] with C 1 or 3 (and H, W at least 1), got "
                        f"{images.dtype} {list(images.shape)}")
    from PIL import Image

    if images.shape[1] * images.shape[2] > 2 * Image.MAX_IMAGE_PIXELS:   # as PIL refuses a folder's image
        raise DataError(f"{path}: images of {images.shape[2]}x{images.shape[1]} pixels are too large to decode (more "
                        f"than {2 * Image.MAX_IMAGE_PIXELS:,} pixels); resize them first")
    if class_names is None and config.num_classes > len(images):   # before a name is made for each of them
        raise DataError(f"{path}: {len(images)} images for num_classes={config.num_classes}, which needs one image of "
                        f"each class at least; give the data's class count (--set num_classes=N) or `class_names`")
    class_names = class_names or [str(i) for i in range(config.num_classes)]
    labels = _check_labels(labels, class_names, str(path), len(images))
    data = ImageSet.undecoded(labels, class_names, str(path), images.shape[-1])
    data.check(config, channels)   # before hours of decompressing or resizing
    nbytes, mtime_ns = _stamp(path)
    if not isinstance(images, np.memmap) or images.shape[1:3] != (size, size):
        key = {"npz": str(path.resolve()), "bytes": nbytes, "mtime_ns": mtime_ns, "size": size}
        source = images
        chunk = max(1, min(CACHE_CHUNK, CHUNK_BYTES // math.prod(images.shape[1:])))
        images = cached_array(Path(cache_dir) / f"pixels-{digest(key)}.npy", key,
                              (len(source), size, size, source.shape[-1]), np.uint8,
                              lambda a, b: resize_array(source[a:b], size), chunk, report)
    data.pixels = images
    data.fingerprint = digest([str(path.resolve()), nbytes, mtime_ns, config.image_size])
    return data


# ---- image folder ------------------------------------------------------------------------------------
def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[Path], np.ndarray]:
    """(class names, image files, labels) of an ImageFolder-layout directory, in a fixed order. Hidden entries
    (names starting with ".") are left out at every level: a hidden class folder, and inside a class the
    macOS ._NAME.png companions (not images) and folders such as .ipynb_checkpoints (copies)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders; an image folder holds one sub-folder of images per class")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _image_files(root / name)
        if not found:
            raise DataError(f"{root / name}: class {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add some or remove the folder")
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _image_files(folder: Path) -> list[Path]:
    """The image files below `folder`, sorted, hidden entries left out. Linked folders are followed, as
    torchvision's ImageFolder follows them (Path.rglob does not enter them before Python 3.13, which left
    their images out without a word), and each real folder is entered once: a link back up cannot loop."""
    found, entered = [], set()
    for top, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in entered:
            folders[:] = []
            continue
        entered.add(real)
        folders[:] = [f for f in folders if not f.startswith(".")]
        found += [Path(top, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS
                  and Path(top, n).is_file()]
    return sorted(found)


def open_image_folder(root: str | os.PathLike, config: ECARConfig, cache_dir: str | os.PathLike,
                      channels: int | None = None, workers: int | None = None,
                      report: Callable[[int, int], None] | None = None) -> ImageSet:
    """An image folder decoded once into a uint8 cache at the config's size; report(done, total) after each
    chunk of the cache build."""
    root = Path(root)
    class_names, files, labels = list_image_folder(root)
    c = channels or config.latent_channels
    if c not in (1, 3):
        raise DataError(f"{root}: image folders give 1 (grayscale) or 3 (RGB) channels, the config needs {c}")
    data = ImageSet.undecoded(labels, class_names, str(root), c)
    data.check(config, channels)   # before hours of decoding
    workers = workers or min(8, os.cpu_count() or 1)
    size = config.image_size
    key = {"folder": str(root.resolve()), "channels": c, "size": size, "rules": DECODE_RULES,
           "files": digest([(str(f.relative_to(root)), *_stamp(f)) for f in files])}
    data.fingerprint = digest(key)
    cache, shape = Path(cache_dir) / f"pixels-{data.fingerprint}.npy", (len(files), size, size, c)
    # a 1-channel config refuses color images once per build (a finished cache opens no image), before the
    # cache's files are made: a refused run leaves none (its work folder then goes, empty)
    headers_read = c == 1 and not is_cached(cache, key, shape, np.uint8)
    if headers_read:
        _check_grayscale(root, files, workers, latent=channels is not None)   # every header: a non-image fails too

    def decode(a: int, b: int) -> np.ndarray:
        nonlocal headers_read
        if not headers_read:   # once per build, before decoding: every file that is not an image at all
            _each_image(_open_header, files[a:], workers)
            headers_read = True
        decoded, failures = _attempt_each(lambda f: _decode_image(f, size, c), files[a:b], workers)
        if failures:   # a file whose header reads but whose data does not (a truncated download): every
            # other such file is found now, by decoding the rest, so that one fix of them all makes the next
            # build the last (fixing a file changes the key, so each build starts from the first image); the
            # images are dropped as they are decoded (the rest of ImageNet would not fit in memory)
            progress = (lambda n: report(b + n, len(files))) if report else None   # hours, for a large folder
            failures += _attempt_each(lambda f: _decode_image(f, size, c) is None, files[b:], workers, progress)[1]
            raise _unreadable(failures)
        return np.stack(decoded)

    # a build that fails on unreadable images is deleted: mending them changes the key, so it is never resumed
    data.pixels = cached_array(cache, key, shape, np.uint8, decode, CACHE_CHUNK, report, discard_on=(DataError,))
    return data


def _check_grayscale(root: Path, files: list[Path], workers: int, latent: bool = False) -> None:
    """A 1-channel config, or a latent model's 1-channel VAE, refuses a folder of color images (its model would
    silently learn them in gray)."""
    color = [f for f, is_color in zip(files, _each_image(_is_color, files, workers)) if is_color]
    if color:
        takes, instead = (("the VAE takes 1 channel", "use an RGB VAE") if latent else
                          ("the config has latent_channels=1",
                           "train a 3-channel config (--preset ecar-emoji32, or --set latent_channels=3)"))
        raise DataError(f"{root}: {len(color)} of {len(files)} images are stored in color (RGB or a color palette: "
                        f"{some_of(color, 3)}) but {takes}; {instead}, or save the images as grayscale "
                        f"(mode L), as gray images stored in RGB must be")


# ---- any source --------------------------------------------------------------------------------------
def open_digits32(config: ECARConfig, train_size: int | None = None) -> ImageSet:
    from .digits import NUM_CLASSES, build_split

    images, labels = build_split("train", train_size, config.image_size)
    data = ImageSet(images, labels, [str(d) for d in range(NUM_CLASSES)], f"{DIGITS32} train split",
                    digest([DIGITS32, len(labels), config.image_size]))
    data.check(config)
    return data


def open_data(spec: str, config: ECARConfig, cache_dir: str | os.PathLike, channels: int | None = None,
              train_size: int | None = None, report: Callable[[int, int], None] | None = None) -> ImageSet:
    """The data set `spec` names (digits32, an .npz file or an image folder) at the config's size.
    channels: the images' channels where they differ from the config's (a latent model's VAE input);
    report(done, total): progress of a cache build (decoding or resizing images)."""
    if spec == DIGITS32:
        if channels:
            raise DataError("digits32 is grayscale pixel data: train it with a pixel config, without --vae")
        return open_digits32(config, train_size)
    if train_size is not None:
        raise DataError("--train-size applies to digits32 only")
    path = Path(spec)
    if path.is_dir():
        return open_image_folder(path, config, cache_dir, channels, report=report)
    if path.suffix.lower() == ".npz" and path.is_file():
        return open_npz(path, config, cache_dir, channels, report)
    if path.exists():
        raise DataError(f"--data {spec}: a file that is not an .npz; give {DIGITS32}, an .npz file or an image "
                        f"folder (one sub-folder per class)")
    raise DataError(f"--data {spec}: not found; give {DIGITS32}, an .npz file or an image folder "
                    f"(one sub-folder per class)")


# ---- what one training step draws -------------------------------------------------------------------
@dataclass
class DataDraws:
    """The data's random inputs of one step for the whole global batch, drawn after the objective's
    draws from the same generator (so a run is the same on any number of ranks): horizontal flips and,
    for latent models, the noise of the latent's posterior sample. None where unused."""

    flip: torch.Tensor | None = None     # [G] bool
    eps: torch.Tensor | None = None      # [G, C, h, w]

    def shard(self, rank: int, world: int) -> "DataDraws":
        return DataDraws(*(None if t is None else t[rank::world] for t in (self.flip, self.eps)))


class PixelBatches:
    """Training batches of a pixel-space model: x0 is the image itself, optionally flipped."""

    def __init__(self, images: ImageSet, flip: bool = False) -> None:
        self.images, self.flip = images, flip
        self.labels = torch.from_numpy(np.asarray(images.labels))
        self.class_names = images.class_names
        self.description = images.description + (", flipped at random" if flip else "")

    def __len__(self) -> int:
        return len(self.images)

    def identity(self) -> dict:
        return self.images.identity()

    def draw(self, gen: torch.Generator, batch: int) -> DataDraws:
        return DataDraws(flip=torch.rand(batch, generator=gen) < 0.5 if self.flip else None)

    def not_finite(self, row: int) -> tuple[str, str]:
        """(where row `row` comes from, what to do) where its values are not finite."""
        return f"image {row} of {self.images.description}", "Every image of the data must be finite"

    def x0(self, index: torch.Tensor, draws: DataDraws) -> torch.Tensor:
        x = self.images.images(index.numpy())
        if draws.flip is not None:
            x = torch.where(draws.flip[:, None, None, None], x.flip(-1), x)
        return x
