"""The emoji32 builder on tiny synthetic npm tarballs (never npm or the network)."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ecar_infer import ECARConfig
from ecar_infer.training.data import DataError, open_npz
from ecar_infer.training.emoji import build, heldout_mask, read_package

CATEGORIES = ["Smileys & Emotion", "Animals & Nature", "Flags"]


def png(color, alpha) -> bytes:
    """A 64x64 RGBA PNG: a solid square of `color` in the middle (alpha `alpha`), transparent around it."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (*color, alpha)
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def make_tarball(path, per_class=(5, 3, 12), drop_image=None, copied=False):
    """copied: every Flags image is drawn as the first one (the package draws some pictures for several emoji)."""
    entries, files = [], {}
    order = 0
    for c, (category, n) in enumerate(zip(CATEGORIES, per_class)):
        for i in range(n):
            name = f"{c:02x}{i:02x}.png"
            entries.append({"image": name, "category": category, "sort_order": order, "short_name": f"e{c}_{i}",
                            "has_img_google": True})
            files[name] = png((40 * c, 0 if copied and category == "Flags" else 10 * i, 200), 255)
            order += 1
    entries.append({"image": "skin.png", "category": "Component", "sort_order": order, "short_name": "skin-tone-2",
                    "has_img_google": True})
    files["skin.png"] = png((200, 150, 100), 255)
    entries.append({"image": "nogoogle.png", "category": "Flags", "sort_order": order + 1, "short_name": "x",
                    "has_img_google": False})
    entries.reverse()   # the builder orders by sort_order, not by file order
    files.pop(drop_image, None)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("package/emoji.json", json.dumps(entries).encode())] + [
                (f"package/img/google/64/{k}", v) for k, v in files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_reads_categories_composites_on_white_and_leaves_out_components(tmp_path):
    images, labels, classes, names = read_package(make_tarball(tmp_path / "p.tgz"))
    assert classes == CATEGORIES   # Component and the entry without a Google image are left out
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [5, 3, 12]
    assert names[:2] == ["e0_0", "e0_1"]
    assert (images[:, :8, :8] == 255).all()   # the transparent border is white
    assert (images[7, 8:24, 8:24] == (40, 20, 200)).all()   # class 1, image 2: its opaque colour, box-halved


def test_build_writes_train_and_heldout_splits_with_class_names(tmp_path):
    counts = build(make_tarball(tmp_path / "p.tgz"), tmp_path / "emoji32.npz")
    assert counts == {"train": {"Smileys & Emotion": 4, "Animals & Nature": 2, "Flags": 11},
                      "heldout": {"Smileys & Emotion": 1, "Animals & Nature": 1, "Flags": 1}}
    config = ECARConfig.preset("ecar-emoji32").replace(num_classes=3)
    train = open_npz(tmp_path / "emoji32.npz", config, tmp_path / "cache")
    held = open_npz(tmp_path / "emoji32-heldout.npz", config, tmp_path / "cache")
    assert train.class_names == CATEGORIES and held.class_names == CATEGORIES
    assert isinstance(train.pixels, np.memmap)   # uncompressed: memory-mapped for training
    both = np.concatenate([train.pixels, held.pixels]).reshape(20, -1)
    assert len(np.unique(both, axis=0)) == 20   # every image lands in exactly one split


def test_heldout_images_identical_to_a_training_image_are_left_out(tmp_path):
    """Held-out copies of training images flattered every measurement against the split (the real package
    put 2 of its 190 held-out images in both splits): they are left out of it, and the training split is the
    draw's rest, as it was before, so that a model trained on it is still measured against unseen images."""
    counts = build(make_tarball(tmp_path / "p.tgz", copied=True), tmp_path / "emoji32.npz")
    assert counts["train"] == {"Smileys & Emotion": 4, "Animals & Nature": 2, "Flags": 11}
    assert counts["heldout"] == {"Smileys & Emotion": 1, "Animals & Nature": 1, "Flags": 0}
    with np.load(tmp_path / "emoji32.npz") as train, np.load(tmp_path / "emoji32-heldout.npz") as held:
        seen = {image.tobytes() for image in train["images"]}
        assert not any(image.tobytes() in seen for image in held["images"])


def test_heldout_draw_is_per_class_seeded_and_at_least_one():
    labels = np.repeat([0, 1, 2], [30, 1, 100])
    mask = heldout_mask(labels, 0.1, seed=0)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [3, 1, 10]
    assert np.array_equal(mask, heldout_mask(labels, 0.1, seed=0))
    assert not np.array_equal(mask, heldout_mask(labels, 0.1, seed=1))


def test_bad_tarballs_are_named(tmp_path):
    with pytest.raises(DataError, match=r"p.tgz: cannot read package/img/google/64/0001.png"):
        read_package(make_tarball(tmp_path / "p.tgz", drop_image="0001.png"))
    (tmp_path / "junk.tgz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.tgz: cannot read the npm tarball"):
        read_package(tmp_path / "junk.tgz")
