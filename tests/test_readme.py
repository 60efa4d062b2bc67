"""The README's Python examples run as they are written: the first in a scratch folder that holds the
repository's weights/ (its relative path), the second after it, with the image and masks it leaves to
the reader."""
import re
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_python_examples_run(tmp_path, monkeypatch):
    sampling, editing = python_blocks()   # a block added or removed must be added here too
    (tmp_path / "weights").symlink_to(REPO / "weights")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(sampling, "README.md, first python block", "exec"), scope)
    out = scope["out"]
    assert len(out.images) == 3 and all(isinstance(i, Image.Image) for i in out.images)
    assert out.seeds == [0, 1, 2] and out.class_labels == [3, 3, 7]
    from ecar_infer import load_checkpoint

    copy, original = load_checkpoint("copy.safetensors"), scope["model"]
    assert copy.checkpoint_metadata["recommended_cfg"] == "2.0"
    assert copy.checkpoint_metadata["recommended_steps"] == original.checkpoint_metadata["recommended_steps"]   # carried over

    # what the second block leaves to the reader: an image file, images with labels, and a keep mask
    out.images[0].save("in.png")
    size = scope["sampler"].config.image_size
    keep = np.zeros((size, size), dtype=bool)
    keep[:, : size // 2] = True
    scope.update(image=out.images[1], images=out.images, labels=out.class_labels, keep=keep)
    exec(compile(editing, "README.md, second python block", "exec"), scope)
    assert len(scope["out"].images) == 8


def test_the_readme_training_example_builds_the_shipped_emoji_architecture():
    """"Training on your own data" trains the architecture of weights/ecar-emoji32.safetensors (for its
    own classes), as it says."""
    from ecar_infer import load_checkpoint
    from ecar_infer.training.train_cli import parse_args
    from ecar_infer.training.prepare import build_config

    section = (REPO / "README.md").read_text().split("## Training on your own data")[1]
    command = re.search(r"^    ecar-train (.*?[^\\])$", section, flags=re.S | re.M)[1].replace("\\\n", " ").split()
    config = build_config(parse_args(command))
    shipped = load_checkpoint(REPO / "weights" / "ecar-emoji32.safetensors").config
    assert config == shipped.replace(num_classes=config.num_classes)


def test_the_layout_names_every_module():
    """The README's Layout is a newcomer's map: a module added without a word there (checks, defaults and
    nine benchmarks had none) is missing from it."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Limitations")]
    words = set(re.findall(r"\w+", layout))
    modules = [p for folder in ("ecar_infer", "ecar_infer/training", "ecar_infer/model", "benchmarks")
               for p in (REPO / folder).glob("*.py") if not p.stem.startswith("__")]
    unnamed = [str(p.relative_to(REPO)) for p in modules
               if p.stem not in words and p.parent.name != "model"]   # model/'s files: "AR trunk, flow head"
    assert not unnamed, f"not in README's Layout: {unnamed}"
