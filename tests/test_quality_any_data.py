"""Quality evaluation of any data set (not only digits32): the reference built from an .npz pair of
splits, and the memorisation share, on small synthetic colour classes."""
import numpy as np
import pytest

from ecar_infer import ECARConfig
from ecar_infer.training.quality import memorisation, reference_from_data


def colour_classes(n_per_class, seed):
    """Three classes of 16x16 RGB images: a red, green or blue square at a random place on noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(3):
        for _ in range(n_per_class):
            image = rng.integers(0, 80, size=(16, 16, 3))
            y, x = rng.integers(0, 8, size=2)
            image[y:y + 8, x:x + 8, c] = 255
            images.append(image)
            labels.append(c)
    return np.array(images, np.uint8), np.array(labels)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    for name, (n, seed) in {"train": (60, 0), "heldout": (20, 1)}.items():
        images, labels = colour_classes(n, seed)
        np.savez(folder / f"{name}.npz", images=images, labels=labels, class_names=np.array(["red", "green", "blue"]))
    config = ECARConfig.preset("ecar-tiny").replace(latent_channels=3, num_classes=3)
    return reference_from_data(str(folder / "train.npz"), str(folder / "heldout.npz"), config, str(folder / "cache"))


def test_classifier_of_any_data_set(reference):
    assert reference.class_names == ["red", "green", "blue"]
    assert reference.train.shape == (180, 3 * 16 * 16)
    assert reference.accuracy(reference.heldout, reference.heldout_labels) > 0.95


def test_memorisation_tells_copies_from_new_images(reference):
    copies = reference.train[::6].reshape(-1, 3, 16, 16)
    new, labels = colour_classes(20, seed=2)
    new = new.transpose(0, 3, 1, 2) / 127.5 - 1
    for threshold in ("pair", "nearest"):
        assert memorisation(copies, reference.train_labels[::6], reference, threshold) == 1.0
    # the pair median saturates (every new image has a training image closer than a typical pair) ...
    assert memorisation(reference.heldout, reference.heldout_labels, reference, "pair") > 0.9
    # ... the nearest-neighbour median does not, and new images of the same kind score like held-out ones
    held = memorisation(reference.heldout, reference.heldout_labels, reference, "nearest")
    fresh = memorisation(new, labels, reference, "nearest")
    assert 0.2 < held < 0.8 and abs(fresh - held) < 0.2


@pytest.mark.parametrize("model, steps", [("ecar-digits32", "0"), ("ecar-emoji32", "3")])
def test_quality_cli_refuses_steps_the_head_cannot_take(model, steps, capsys):
    from ecar_infer.training.quality import main
    from ecar_infer.weights import shipped_checkpoint

    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(shipped_checkpoint(model)), "--steps", steps])
    assert exit_info.value.code == 2
    assert "--steps" in capsys.readouterr().err
