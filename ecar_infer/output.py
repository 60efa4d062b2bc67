"""Sampling results and their conversions: uint8 images, PIL, grids, and atomic image / NPZ writes."""
from __future__ import annotations

import itertools
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .atomic import atomic_path
from .checks import MAX_RECORD_BYTES

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class SampleOutput:
    """images: list of PIL images ("pil"), uint8 [B, H, W, C] array ("np"), float [B, C, H, W] in [0, 1]
    ("pt"), or the [B, C, h, w] latent in scaled latent space ("latent"); tensors are fp32 on the CPU
    whatever the sampler's device and dtype. seeds[k] regenerates image k, up to the rounding of a batch
    of another size."""

    images: Any
    seeds: list[int]
    class_labels: list[int]
    timings: dict[str, float] = field(default_factory=dict)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (CPU)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def convert(images: torch.Tensor, output_type: str) -> Any:
    """Decoded images in [-1, 1] -> the requested output type (not "latent")."""
    if output_type == "pt":
        # on the CPU like every other output type (and like "latent"): a sampler on CUDA must not hand back
        # CUDA tensors for "pt" alone, nor for some edits and not others (a fully kept edit returns its input)
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()
    array = to_uint8(images).numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]
    raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def join_outputs(pieces: list, output_type: str) -> Any:
    """One output of the given type from the converted outputs of consecutive chunks, in order."""
    if output_type == "pil":
        return [image for piece in pieces for image in piece]
    if output_type == "np":
        return np.concatenate(pieces)
    return torch.cat(pieces)


def make_grid(array: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [B, H, W, C] -> one uint8 [rows*(H+pad)-pad, cols*(W+pad)-pad, C] image."""
    b, h, w, c = array.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype=np.uint8)
    for i, img in enumerate(array):
        r, col = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = img
    return grid


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # Pillow's names
LOSSY_QUALITY = 95  # JPEG and WebP quality (Pillow's default of 75 blurs small samples visibly)
NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # every member's zip timestamp: the same images give the same bytes


def image_format(path: str | os.PathLike) -> str:
    """Pillow's format name for the image file `path` names by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"cannot tell the image format of {str(path)!r}: name it with one of "
                         f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def save_image(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write one uint8 [H, W, C] image atomically, as PNG, JPEG or WebP after the path's extension."""
    from PIL import Image

    fmt = image_format(path)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    options = {} if fmt == "PNG" else {"quality": LOSSY_QUALITY}
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **options)


def rgb(array: np.ndarray) -> np.ndarray:
    """uint8 [..., C] with C = 1 or 3 -> 3 channels (evaluators read RGB)."""
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def save_npz(array: np.ndarray, labels: Sequence[int], path: str | os.PathLike) -> None:
    """Write an ADM-evaluator sample file atomically: uint8 NHWC `arr_0` (3 channels) and `labels`."""
    _write_npz(path, [array], labels)


def join_npz(files: Sequence[str | os.PathLike], labels: Sequence[int], path: str | os.PathLike,
             settings: str | None = None, sizes: Sequence[int] | None = None) -> None:
    """Join the `arr_0` of several sample files, in order, into one sample file for `labels`, streaming
    one file at a time (a 50,000-image file need not fit in memory twice); `settings` (text) is stored
    beside them as a 0-d string array `settings`, which evaluators ignore; `sizes`, if given, is how many
    images each file holds. ValueError if a file cannot be read, holds another number of images than its
    size, or its images do not fit the first file's (naming both: either may be the odd one)."""

    def arrays() -> Iterator[np.ndarray]:
        first = None
        for i, file in enumerate(map(Path, files)):
            try:
                shape, _, _ = npz_member_header(file, "arr_0")   # a damaged header: known before numpy allocates it
                count = shape[0] if shape else 0
                if sizes is None or count == sizes[i]:
                    with np.load(file, allow_pickle=False) as data:
                        images = data["arr_0"]
            except (KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:   # a damaged or empty file
                raise ValueError(f"{file.name} cannot be read ({err})") from None
            if sizes is not None and count != sizes[i]:
                raise ValueError(f"{file.name} holds {count} images, not {sizes[i]}")
            first = first or (file.name, images.dtype, images.shape[1:])
            if (images.dtype, images.shape[1:]) != first[1:]:
                raise ValueError(f"{file.name} holds images of {images.dtype} {images.shape[1:]} where {first[0]} "
                                 f"holds {first[1]} {first[2]}")
            yield images

    _write_npz(path, arrays(), labels, settings)


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) from the .npy header at the start of the file object `f`."""
    version = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f))


def npz_member_header(path: str | os.PathLike, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of the member `name` of an .npz, from its header alone. ValueError if it
    describes more bytes than the member holds (a damaged or crafted file: numpy allocates all it describes
    before reading any); the size of an array of Python objects is not checked (its bytes are a pickle):
    callers that never load objects refuse them. KeyError if there is no such member."""
    with zipfile.ZipFile(path) as archive, archive.open(name + ".npy") as f:
        shape, fortran, dtype = npy_header(f)
        described, held = f.tell() + dtype.itemsize * math.prod(shape), archive.getinfo(name + ".npy").file_size
    if described > held and not dtype.hasobject:
        raise ValueError(f"`{name}` describes {dtype} {list(shape)} ({described:,} bytes) but holds {held:,} bytes")
    return shape, fortran, dtype


def npz_settings(path: str | os.PathLike) -> str | None:
    """The `settings` text join_npz stored in a sample file, or None if it has none; OSError or ValueError
    if the file is no .npz."""
    with np.load(path, allow_pickle=False) as data:
        if "settings" not in data.files:
            return None
        shape, _, dtype = npz_member_header(path, "settings")
        if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * MAX_RECORD_BYTES:   # before it is read
            raise ValueError(f"its settings entry is {dtype} {list(shape)}, not a string of a record's size")
        return str(data["settings"])


def _write_npz(path: str | os.PathLike, arrays: Iterable[np.ndarray], labels: Sequence[int],
               settings: str | None = None) -> None:
    """What np.savez writes (an uncompressed zip of arr_0.npy and labels.npy, readable by np.load), with
    arr_0 streamed from `arrays` and fixed timestamps, so the file's bytes depend only on the images."""
    labels = np.asarray(labels, dtype=np.int64)
    arrays = iter(arrays)
    first = rgb(next(arrays))
    shape = (len(labels), *first.shape[1:])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(zipfile.ZipInfo("arr_0.npy", NPZ_DATE), "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            rows = 0
            for array in itertools.chain([first], map(rgb, arrays)):
                if array.dtype != np.uint8 or array.shape[1:] != shape[1:]:
                    raise ValueError(f"images of {array.dtype} {array.shape[1:]} do not fit uint8 {shape[1:]}")
                member.write(np.ascontiguousarray(array).tobytes())
                rows += len(array)
            if rows != len(labels):
                raise ValueError(f"{rows} images for {len(labels)} labels")
        with archive.open(zipfile.ZipInfo("labels.npy", NPZ_DATE), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, labels, allow_pickle=False)
        if settings is not None:
            with archive.open(zipfile.ZipInfo("settings.npy", NPZ_DATE), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.array(settings), allow_pickle=False)
