"""emoji32: the Noto Emoji images as a class-conditional 32x32 RGB data set, one class per emoji category.

Source: the npm package emoji-datasource-google (version 16.0.0), whose img/google/64/ folder holds the
Google (Noto Emoji) images as 64x64 RGBA PNGs and whose emoji.json gives each emoji's category. The
images are Google's Noto Emoji, licensed under the Apache License 2.0 (https://github.com/googlefonts/noto-emoji);
the package's data and code are MIT-licensed (Cal Henderson, https://github.com/iamcal/emoji-data).

    npm pack emoji-datasource-google@16.0.0     # -> emoji-datasource-google-16.0.0.tgz (74 MB, read as is)
    python -m ecar_infer.training.emoji emoji-datasource-google-16.0.0.tgz --out emoji32.npz

writes emoji32.npz (the training split) and emoji32-heldout.npz, each an ecar-train data set (uint8
`images` [N, 32, 32, 3], `labels`, `class_names`; uncompressed, so training memory-maps it). Each entry
of emoji.json with a Google image is one image (its skin-tone variants are left out: near copies); the
"Component" category (the five skin-tone swatches) is left out, leaving nine classes, ordered as
emoji.json orders the categories. Each image is composited on white at 64x64, then brought to 32x32 by
the training resize rule (here one 2x box filter). The held-out split is drawn per class: a seeded
random tenth of each category (at least one image drawn), less the images identical to a training image (the
package draws some pictures for several emoji: territories that share a flag, some families), which would
flatter every measurement against it; the training split is the draw's rest, as before.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..pil_input import as_model_image, resize_center_crop
from .data import DataError

IMAGE_DIR = "package/img/google/64/"
LEFT_OUT = ("Component",)
IMAGE_SIZE = 32
HELDOUT_FRACTION = 0.1


def _read_members(tarball: str | Path) -> dict[str, bytes]:
    """emoji.json and the 64 px images of the tarball, by member name."""
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            return {m.name: archive.extractfile(m).read() for m in archive
                    if m.isfile() and (m.name == "package/emoji.json" or m.name.startswith(IMAGE_DIR))}
    except (OSError, tarfile.TarError, EOFError) as err:
        raise DataError(f"{tarball}: cannot read the npm tarball ({err})") from None


def read_package(tarball: str | Path, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(images uint8 [N, size, size, 3], labels [N], class names, emoji short names) from the npm tarball."""
    from PIL import Image

    files = _read_members(tarball)   # one pass: a gzip stream cannot seek back cheaply
    try:
        entries = json.loads(files["package/emoji.json"])
    except (KeyError, ValueError) as err:
        raise DataError(f"{tarball}: no readable package/emoji.json ({err}); is this "
                        f"`npm pack emoji-datasource-google`?") from None
    entries = sorted((e for e in entries if e.get("has_img_google") and e["category"] not in LEFT_OUT),
                     key=lambda e: e["sort_order"])
    classes = list(dict.fromkeys(e["category"] for e in entries))   # in emoji.json's category order
    images = []
    for e in entries:
        member = IMAGE_DIR + e["image"]
        try:
            with Image.open(io.BytesIO(files[member])) as image:
                image.load()
                rgb = as_model_image(image, 3)
        except (KeyError, OSError) as err:
            raise DataError(f"{tarball}: cannot read {member} ({err!r})") from None
        images.append(np.asarray(resize_center_crop(rgb, size), dtype=np.uint8))
    labels = np.array([classes.index(e["category"]) for e in entries], dtype=np.int64)
    return np.stack(images), labels, classes, [e["short_name"] for e in entries]


def heldout_mask(labels: np.ndarray, fraction: float = HELDOUT_FRACTION, seed: int = 0) -> np.ndarray:
    """A seeded per-class draw: round(fraction * n) images (at least 1) of each class of n images."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        mask[rng.choice(members, max(1, round(fraction * len(members))), replace=False)] = True
    return mask


def copies_of(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Whether each image is pixel for pixel one of `pool`'s."""
    seen = {image.tobytes() for image in pool}
    return np.array([image.tobytes() in seen for image in images], dtype=bool)


def save_split(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, class_names=np.array(classes), emoji=np.array(names))


def build(tarball: str | Path, out: str | Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write the training split to `out` and the held-out split beside it (NAME-heldout.npz); return the
    image count of each class in each split."""
    out = Path(out)
    images, labels, classes, names = read_package(tarball)
    drawn = heldout_mask(labels, seed=seed)
    held = drawn.copy()
    held[drawn] = ~copies_of(images[drawn], images[~drawn])
    counts = {}
    for split, mask, path in (("train", ~drawn, out), ("heldout", held, out.with_name(out.stem + "-heldout.npz"))):
        save_split(path, images[mask], labels[mask], classes, [n for n, m in zip(names, mask) if m])
        counts[split] = {c: int((labels[mask] == i).sum()) for i, c in enumerate(classes)}
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tarball", help="emoji-datasource-google-16.0.0.tgz (npm pack emoji-datasource-google@16.0.0)")
    parser.add_argument("--out", default="emoji32.npz", help="training split; the held-out split goes beside it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    args = parser.parse_args(argv)
    try:
        counts = build(args.tarball, args.out, args.seed)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
