"""Class names: parsing and resolving, the checkpoint round trip, ecar-sample --class NAME, row labels."""
import json

import numpy as np
import pytest

from conftest import random_model
from ecar_infer import ECARConfig, load_checkpoint, save_checkpoint
from ecar_infer.checkpoint import CheckpointError
from ecar_infer.class_names import (ClassNameError, encode_class_names, label_rows, list_classes,
                                    parse_class_names, resolve_class)
from ecar_infer.cli import expand_classes, main as sample_main

NAMES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
         "Activities", "Objects", "Symbols", "Flags", "Sports"]


def test_resolve_by_index_name_and_prefix():
    assert resolve_class("3", NAMES, 10) == 3
    assert resolve_class("objects", NAMES, 10) == 6
    assert resolve_class("FOOD", NAMES, 10) == 3
    assert resolve_class("  flags ", NAMES, 10) == 8
    assert resolve_class("sy", NAMES, 10) == 7
    with pytest.raises(ClassNameError, match="ambiguous: it begins Smileys & Emotion, Symbols, Sports"):
        resolve_class("s", NAMES, 10)
    with pytest.raises(ClassNameError, match="no class 'robots'; the classes are 0 Smileys & Emotion, .*9 Sports"):
        resolve_class("robots", NAMES, 10)
    with pytest.raises(ClassNameError, match="an empty class name; the classes are 0 Smileys"):   # was "ambiguous"
        resolve_class(" ", NAMES, 10)
    with pytest.raises(ClassNameError, match="class 12 is outside this model's classes: 0 Smileys"):
        resolve_class("12", NAMES, 10)
    # digits that int() does not read ('²'.isdigit() is True) are no index: a name, or an error that lists them
    with pytest.raises(ClassNameError, match="no class '²'; the classes are 0 Smileys"):
        resolve_class("²", NAMES, 10)
    with pytest.raises(ClassNameError, match="class '²': this model has no class names; give an index 0-9"):
        resolve_class("²", None, 10)
    assert resolve_class("٣", None, 10) == 3     # a decimal digit of another script is what int() reads


def test_the_last_class_is_an_index_and_the_null_class_is_not():
    """Index num_classes is the null (unconditional) class: never a class a user can ask for."""
    assert resolve_class("9", NAMES, 10) == 9 and resolve_class("9", None, 10) == 9
    for names in (NAMES, None):
        with pytest.raises(ClassNameError, match="class 10 is outside this model's classes"):
            resolve_class("10", names, 10)
    with pytest.raises(ClassNameError, match="has no class names; give an index 0-9"):
        resolve_class("cat", None, 10)


def test_exact_name_wins_over_a_longer_one():
    assert resolve_class("cat", ["catfish", "cat"], 2) == 1
    assert resolve_class("CAT", ["catfish", "cat"], 2) == 1   # exact in any case, not an ambiguous prefix
    assert resolve_class("cat", ["Catfish", "Cat"], 2) == 1


def test_names_match_whatever_the_unicode_form():
    """A name typed with a combining accent (as macOS keyboards and file names give it), or in fullwidth
    letters, finds the precomposed name, exactly and as a prefix; two names that differ only in form are
    refused, as two that differ only in case are."""
    names = ["Caf\u00e9 & Bar", "Drinks"]
    assert resolve_class("cafe\u0301 & bar", names, 2) == 0
    assert resolve_class("CAFE\u0301", names, 2) == 0
    assert resolve_class("\uff24rinks", names, 2) == 1        # fullwidth D
    assert resolve_class("dri", ["Caf\u00e9", "\uff24rinks"], 2) == 1   # a prefix of a name written fullwidth
    assert resolve_class("Café & Bar".replace("é", "e\u0301"), ["Cafe & Bar", "Café & Bar"], 2) == 1
    with pytest.raises(ClassNameError, match="differ only in case or Unicode form"):
        parse_class_names(json.dumps(["Caf\u00e9", "Cafe\u0301"]), 2)
    assert expand_classes([["cafe\u0301 & bar"]], 2, 1, names) == [0]
    assert expand_classes([["0"]], 2, 1, ["\uff11", "\uff10"]) == [1]   # classes named by fullwidth digits: by name


def test_names_made_of_digits_are_found_by_name_first():
    folders = sorted(str(k) for k in range(12))  # an image folder's classes 0..11, in sorted (string) order
    assert folders[4] == "2"
    assert resolve_class("2", folders, 12) == 4       # the class named "2", not index 2 (named "10")
    assert resolve_class("3d", ["2d", "3d"], 2) == 1
    assert resolve_class("01_cat", ["01_cat", "02_dog"], 2) == 0
    assert resolve_class("1", ["2d", "3d"], 2) == 1   # no such name: an index


@pytest.mark.parametrize("text, problem", [("not json", "JSON list"), ('{"a": 1}', "JSON list"),
                                           ('["a", 3]', "JSON list"), ('["a", ""]', "JSON list"),
                                           ('["a", " "]', "JSON list"), ('["a", "\\t\\n"]', "JSON list"),
                                           ('["a"]', "1 names for 2 classes"),
                                           ('["Cat", "cat"]', r"differ only in case .*\('Cat' and 'cat'\)"),
                                           ('["a", "a"]', r"\('a' and 'a'\), or repeat"),
                                           # a folder may be called so: it broke --label-rows and one-line errors
                                           ('["a\\nb", "c"]', r"a control character .*: 'a\\nb'"),
                                           ('["a\\u2028b", "c"]', r"a control character"),   # a line separator
                                           # at the end too (names read with readlines()), where strip() drops it
                                           ('["a\\n", "c"]', r"a control character .*: 'a\\n'"),
                                           ('["Straße", "STRASSE"]', "differ only in case")])  # casefold, not lower
def test_malformed_entries_are_refused(text, problem):
    with pytest.raises(ClassNameError, match=problem):
        parse_class_names(text, 2)
    names = json.loads(text) if text.startswith("[") else None
    if isinstance(names, list):  # ecar-train writes the entry with encode_class_names: it refuses the same
        with pytest.raises(ClassNameError, match=problem):
            encode_class_names(names, 2)


def test_listing_is_bounded():
    assert list_classes(None, 5) == "indices 0-4 (this model has no class names)"
    many = [f"c{i}" for i in range(1000)]
    assert list_classes(many, 1000, limit=3) == "0 c0, 1 c1, 2 c2 and 997 more"
    assert list_classes(many[:3], 3, limit=3) == "0 c0, 1 c1, 2 c2"  # all shown: nothing "more"
    assert list_classes(many[:4], 4, limit=3) == "0 c0, 1 c1, 2 c2 and 1 more"


@pytest.fixture
def named_checkpoint(tmp_path):
    config = ECARConfig.preset("ecar-tiny")
    path = tmp_path / "named.safetensors"
    save_checkpoint(random_model(config), path, extra_metadata={"class_names": encode_class_names(NAMES, 10),
                                                                "recommended_steps": "1"})
    return path


def test_names_round_trip_through_a_checkpoint(named_checkpoint, tmp_path):
    model = load_checkpoint(named_checkpoint)
    assert json.loads(model.checkpoint_metadata["class_names"]) == NAMES
    with pytest.raises(CheckpointError, match="class_names has 3 names for 10 classes"):
        save_checkpoint(model, tmp_path / "bad.safetensors", extra_metadata={"class_names": '["a", "b", "c"]'})


def test_the_python_api_gives_names_and_resolves_them_as_the_command_line_does(named_checkpoint):
    """Sampler.class_names and Sampler.class_index: the same classes, by the same rules, as --class."""
    from ecar_infer import Sampler

    sampler = Sampler.from_pretrained(named_checkpoint, device="cpu")
    assert sampler.class_names == NAMES
    for text in ("smileys & emotion", "FLAGS", "foo", "sp", "7", " objects "):
        assert sampler.class_index(text) == resolve_class(text, NAMES, 10)
    assert [sampler.class_index(t) for t in ("SMILEYS & EMOTION", "foo", "sp", "7")] == [0, 3, 9, 7]
    with pytest.raises(ClassNameError, match="ambiguous: it begins Smileys & Emotion, Symbols, Sports"):
        sampler.class_index("s")
    with pytest.raises(ClassNameError, match="no class 'cars'; the classes are 0 Smileys & Emotion, 1 People"):
        sampler.class_index("cars")
    with pytest.raises(TypeError, match="takes a class name"):
        sampler.class_index(3)
    unnamed = Sampler.from_config(ECARConfig.preset("ecar-tiny"), device="cpu")
    assert unnamed.class_names is None and unnamed.class_index("4") == 4
    with pytest.raises(ClassNameError, match="has no class names"):
        unnamed.class_index("flags")


def test_a_checkpoint_with_bad_names_is_refused_on_load(named_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(named_checkpoint, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "forged.safetensors", metadata={**meta, "class_names": "[1, 2]"})
    with pytest.raises(CheckpointError, match="forged.safetensors: class_names must be a JSON list"):
        load_checkpoint(tmp_path / "forged.safetensors")


def test_ecar_sample_takes_names_and_lists_them_on_error(named_checkpoint, tmp_path, capsys):
    by_name, by_index = tmp_path / "name.npz", tmp_path / "index.npz"
    common = ["--ckpt", str(named_checkpoint), "--n", "2", "--device", "cpu", "-q"]
    assert sample_main(common + ["--class", "animals,flags", "--npz", str(by_name)]) == 0
    assert sample_main(common + ["--class", "2,8", "--npz", str(by_index)]) == 0
    with np.load(by_name) as a, np.load(by_index) as b:
        assert a["labels"].tolist() == [2, 2, 8, 8]
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert sample_main(common + ["--class", "robots", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--class: no class 'robots'; the classes are 0 Smileys & Emotion" in err and "9 Sports" in err
    assert sample_main(common + ["--class", "11", "--out", str(tmp_path / "x.png")]) == 2
    assert "outside this model's classes: 0 Smileys & Emotion" in capsys.readouterr().err


def test_grid_rows_are_labelled(named_checkpoint, tmp_path):
    from PIL import Image

    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    common = ["--ckpt", str(named_checkpoint), "--n", "3", "--class", "food,objects", "--device", "cpu", "-q"]
    assert sample_main(common + ["--out", str(plain)]) == 0
    assert sample_main(common + ["--out", str(labelled), "--label-rows"]) == 0
    a, b = np.asarray(Image.open(plain)), np.asarray(Image.open(labelled))
    margin = b.shape[1] - a.shape[1]
    assert b.shape[0] == a.shape[0] and margin > 20
    assert np.array_equal(b[:, margin:], a)   # the images are untouched, the labels sit in the margin
    assert (b[:, :margin] < 128).any()   # some dark text


def test_labelled_rows_hold_one_class_each_however_many_images_it_has(named_checkpoint, tmp_path, monkeypatch):
    """More images per class than an unlabelled grid puts in a row (16): with --label-rows each class still
    gets a row of its own, so that no row is labelled with two classes."""
    from ecar_infer import class_names

    seen = []
    monkeypatch.setattr(class_names, "label_rows", lambda grid, row_labels, *a, **k: seen.append(row_labels) or grid)
    out = tmp_path / "g.png"
    assert sample_main(["--ckpt", str(named_checkpoint), "--n", "17", "--class", "food,objects", "--steps", "1",
                        "--device", "cpu", "-q", "--out", str(out), "--label-rows"]) == 0
    from PIL import Image

    side = load_checkpoint(named_checkpoint).config.image_size + 2   # make_grid's 2-pixel gaps
    assert seen == [["Food & Drink", "Objects"]]
    assert Image.open(out).size == (17 * side - 2, 2 * side - 2)


def test_label_rows_keeps_grayscale_and_places_each_label_by_its_row():
    grid = np.full((16 * 2 + 2, 16, 1), 128, np.uint8)
    out = label_rows(grid, ["top", "bottom"], row_height=16)
    assert out.shape[2] == 1 and out.shape[0] == grid.shape[0]
    margin = out.shape[1] - 16
    ink_rows = np.flatnonzero((out[:, :margin, 0] < 128).any(axis=1))
    assert ink_rows.min() < 16 and ink_rows.max() >= 18   # ink in both rows


def test_labels_are_drawn_in_a_font_that_has_their_glyphs_or_spelt_plainly(monkeypatch):
    """Pillow's default font draws ASCII only: "café" came out "caf" and a missing-glyph box, a CJK name a row
    of boxes. A label goes to the first font that has all its glyphs (DejaVu Sans, where installed); without
    one, its accents are dropped and what is still missing is drawn as "?"."""
    from ecar_infer import class_names

    default = class_names._fonts()[0]
    assert class_names.drawable("Food & Drink") == ("Food & Drink", default)
    assert not class_names._has_glyph(default, "é") and class_names._has_glyph(default, "e")
    if len(class_names._fonts()) > 1:   # a wide font is installed (DejaVu Sans on most Linux systems)
        text, font = class_names.drawable("café")
        assert text == "café" and font is class_names._fonts()[1]
    monkeypatch.setattr(class_names, "_fonts", lambda: (default,))   # a system without one
    plain = [class_names.drawable(name)[0] for name in ("café", "Ñandú", "猫", "a猫b")]
    assert plain == ["cafe", "Nandu", "?", "a?b"]
    grid = np.full((16, 16, 3), 128, np.uint8)
    assert label_rows(grid, ["café"], 16).shape == label_rows(grid, ["cafe"], 16).shape


def test_each_label_is_measured_and_drawn_in_its_own_font():
    """A row's label is drawn in the font drawable() picked for it, whatever the other rows' labels (drawn in
    the first row's font, 'cat' below 'café' came out in DejaVu Sans), and the margin is measured in that font:
    measured in the default font, 'café' in DejaVu Sans (wider) ran into the grid."""
    from ecar_infer import class_names

    if len(class_names._fonts()) < 2:
        pytest.skip("no wide font (DejaVu Sans) installed")
    assert class_names.drawable("café")[1] is not class_names.drawable("cat")[1]
    grid = np.full((16 * 2 + 2, 16, 3), 128, np.uint8)
    out = label_rows(grid, ["café", "cat"], row_height=16)
    margin = out.shape[1] - 16
    assert np.array_equal(out[:, margin:], grid), "a label ran into the grid"
    alone = label_rows(grid[:16], ["cat"], row_height=16)
    shown = alone.shape[1] - 16
    assert np.array_equal(out[18:34, :shown], alone[:, :shown])


def test_the_wide_font_has_the_defaults_size_and_a_label_no_font_draws_whole_is_in_the_default():
    """The wide font is loaded at the default font's size (a larger one made accented rows taller than the
    others), and a label that no font draws whole falls back to the default font, spelt plainly."""
    from ecar_infer import class_names

    default, *wide = class_names._fonts()
    assert all(class_names._size(font) == class_names._size(default) for font in wide)
    assert class_names.drawable("猫") == ("?", default) and class_names.drawable("Ñandú猫") == ("Nandu?", default)


def test_labels_are_drawn_by_a_pillow_built_without_freetype(monkeypatch):
    """There the default is a bitmap font of printable ASCII and truetype() raises ImportError: the wide font
    was looked for with `except OSError` and U+E000 drawn in the bitmap font (a UnicodeEncodeError), so every
    labelled grid failed, "cat" included."""
    from PIL import ImageFont

    from ecar_infer import class_names

    def no_freetype(*args, **kwargs):
        raise ImportError("The _imagingft C module is not installed")

    monkeypatch.setattr(ImageFont, "load_default", ImageFont.load_default_imagefont)
    monkeypatch.setattr(ImageFont, "truetype", no_freetype)
    class_names._fonts.cache_clear()
    try:
        assert [class_names.drawable(name)[0] for name in ("cat", "café", "猫")] == ["cat", "cafe", "?"]
        assert len(class_names._fonts()) == 1
        out = label_rows(np.full((16, 16, 3), 128, np.uint8), ["café"], 16)
        assert (out[:, : out.shape[1] - 16] < 128).any()   # ink in the margin
    finally:
        class_names._fonts.cache_clear()


def test_a_space_the_default_font_lacks_sends_the_label_to_a_wide_font():
    """A no-break space counted as drawn (any whitespace did), and the default font drew it as a box."""
    from ecar_infer import class_names

    default = class_names._fonts()[0]
    assert class_names._has_glyph(default, " ") and not class_names._has_glyph(default, "\xa0")
    if len(class_names._fonts()) > 1:
        assert class_names.drawable("a\xa0b") == ("a\xa0b", class_names._fonts()[1])


@pytest.mark.parametrize("labels, columns, expected", [
    ([0, 0, 0, 0, 1, 1, 2, 3, 3, 3], 3,     # rows [0 0 0] [0 1 1] [2 3 3] [3]
     ["Smileys & Emotion", "Smileys & Emotion, People & Body", "Animals & Nature, Food & Drink", "Food & Drink"]),
    ([0, 0, 0, 1, 1, 2, 3, 3, 3, 3], None,  # ceil(sqrt(10)) = 4 columns: [0 0 0 1] [1 2 3 3] [3 3]
     ["Smileys & Emotion, People & Body", "People & Body, Animals & Nature, Food & Drink", "Food & Drink"]),
])
def test_each_grid_row_is_labelled_with_the_classes_of_its_own_images(tmp_path, monkeypatch, labels, columns,
                                                                      expected):
    """Rows are read left to right, top to bottom, as make_grid lays them out; a row names each of its
    classes once, in order."""
    from ecar_infer import class_names
    from ecar_infer.targets import GridTarget

    seen = []
    monkeypatch.setattr(class_names, "label_rows", lambda grid, row_labels, *a, **k: seen.append(row_labels) or grid)
    target = GridTarget(tmp_path / "g.png", labels, list(range(len(labels))), 4, columns, NAMES)
    target.start({})
    for b, batch in enumerate(target.batches):
        target.write(b, np.full((len(batch), 8, 8, 1), 7 * b, np.uint8))
    target.finish()
    assert seen == [expected]


def test_ecar_sample_finds_classes_named_by_digits_by_name(tmp_path, capsys):
    names = ["2", "3d", "10", "a", "b", "c", "d", "e", "f", "g"]
    path = tmp_path / "digit-names.safetensors"
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=4), path,
                    extra_metadata={"class_names": encode_class_names(names, 10)})
    out = tmp_path / "s.npz"
    args = ["--ckpt", str(path), "--class", "2,3D,5-6,1", "--steps", "1", "--npz", str(out), "--device", "cpu", "-q"]
    assert sample_main(args) == 0, capsys.readouterr().err
    with np.load(out) as data:
        assert data["labels"].tolist() == [0, 1, 5, 6, 1]  # "2" and "3D" by name; 5-6 and 1 as indices
    assert sample_main(["--ckpt", str(path), "--class", "6-5", "--out", str(tmp_path / "x.png"), "-q"]) == 2
    assert "--class 6-5: a range runs from low to high, e.g. 5-6" in capsys.readouterr().err
