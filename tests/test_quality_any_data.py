"""Quality evaluation of any data set (not only digits32): the reference built from an .npz pair of
splits, and the memorisation share, on small synthetic colour classes."""
from types import SimpleNamespace

import numpy as np
import pytest

from ecar_infer import ECARConfig
from ecar_infer.training.quality import Reference, memorisation, reference_from_data


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


def points(xs, y=0.0, dims=4):
    """Images of `dims` pixels whose first two pixels are (x, y): distances between them are known by hand."""
    out = np.zeros((len(xs), dims))
    out[:, 0], out[:, 1] = xs, y
    return out


def hand_built_reference():
    """Class 0: training images on a line at 0, 1, 3, 7 (pair distances 1, 2, 3, 4, 6, 7: median 3.5, mean 3.83,
    median 2.5 if the zero self-distances were counted; nearest-neighbour distances 1, 1, 2, 4: median 1.5,
    mean 2). Class 1, 100 away: at 0, 2, 6, 14 (pair median 7; nearest-neighbour distances 2, 2, 4, 8: median 3).
    The held-out images lie far from everything."""
    train = np.concatenate([points([0, 1, 3, 7]), points([0, 2, 6, 14], y=100.0)])
    return Reference(classifier=None, train=train, heldout=points([50.0, 60.0], y=-50.0), heldout_labels=np.zeros(2),
                     train_labels=np.repeat([0, 1], 4))


@pytest.mark.parametrize("threshold, closer", [
    # for each image below: is its nearest training image (of any class) closer than its class's median?
    ("pair", [True, True, True, False, False, True, False, True, True]),
    ("nearest", [True, False, False, False, False, False, False, True, True]),
])
def test_memorisation_of_hand_built_points(threshold, closer):
    ref = hand_built_reference()
    images = np.concatenate([
        # class 0: nearest training image 1.2, 1.8, 3 (to 7), 3.7, 5, 1.55 and 3.52 away
        points([-1.2, -1.8, 10.0, 10.7, 12.0, -1.55, 10.52]),
        points([-2.5], y=100.0),                         # class 1: nearest 2.5
        points([3.0]),                                   # class 1, but a copy of a class-0 training image
    ])
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1])
    # a share of images (class 0 has 7 of the 9), not a mean of per-class shares
    assert memorisation(images, labels, ref, threshold) == pytest.approx(np.mean(closer))
    # more images than one chunk of the distance computation: 300 copies, then 100 far from everything
    many = np.concatenate([ref.train[np.arange(300) % 8], points(np.full(100, 40.0))])
    many_labels = np.concatenate([ref.train_labels[np.arange(300) % 8], np.zeros(100, int)])
    assert memorisation(many, many_labels, ref, threshold) == pytest.approx(0.75)


def test_accuracy_is_the_share_of_images_classified_right():
    # a stand-in classifier that reads its prediction off the first pixel; 3 of 4 images right, but only one of
    # the two classes (a per-class mean would say 0.5)
    ref = Reference(SimpleNamespace(predict=lambda x: x[:, 0].astype(int)), train=points([0]), heldout=points([0]),
                    heldout_labels=np.zeros(1))
    assert ref.accuracy(points([0, 0, 0, 0]), np.array([0, 0, 0, 1])) == 0.75


def test_features_are_the_whitened_pca_of_the_training_split(reference):
    train = reference.features(reference.train)
    assert train.shape == (180, 40)
    # whitened and centred on the training split: mean 0 and covariance I there (not on the held-out images)
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-8)
    np.testing.assert_allclose(np.cov(train, rowvar=False), np.eye(40), atol=1e-6)
    assert np.abs(reference.features(reference.heldout).mean(0)).max() > 0.1
    # one fixed map: an image's features do not depend on the images judged with it
    both = reference.features(np.concatenate([reference.heldout, reference.train]))
    np.testing.assert_allclose(both[len(reference.heldout):], train, atol=1e-9)
    np.testing.assert_allclose(reference.features(reference.heldout[:3]), both[:3], atol=1e-9)


class CopiesOrNoise:
    """A stand-in sampler: with guidance, copies of the reference's training images of each class asked for;
    without, uniform noise."""

    def __init__(self, ref):
        self.ref, self.asked = ref, []
        self.config = SimpleNamespace(num_classes=3)
        self.defaults = SimpleNamespace(cfg_scale=3.0, cfg_schedule="constant", steps_per_stage=2,
                                        cfg_interval=(0.55, 0.9))

    def generate(self, labels, seed, output_type, progress, cfg_scale):
        self.asked.append(cfg_scale)
        labels = np.asarray(labels)
        if cfg_scale == 1.0:
            return SimpleNamespace(images=np.random.default_rng(seed).integers(0, 256, (len(labels), 16, 16, 3)))
        rows = np.concatenate([np.flatnonzero(self.ref.train_labels == c)[:(labels == c).sum()] for c in range(3)])
        images = self.ref.train[rows].reshape(-1, 3, 16, 16).transpose(0, 2, 3, 1)
        return SimpleNamespace(images=np.rint((images + 1) * 127.5).astype(np.uint8))


def test_evaluate_reports_each_setting_under_its_own_name(reference):
    from ecar_infer.training.quality import evaluate, frechet_distance

    sampler = CopiesOrNoise(reference)
    report = evaluate(sampler, reference, per_class=10, seed=5)
    assert sampler.asked == [1.0, 3.0]
    unguided, guided = report["settings"]["no guidance"], report["settings"]["recommended"]
    assert (unguided["cfg_scale"], unguided["cfg_interval"]) == (1.0, None)
    assert (guided["cfg_scale"], guided["cfg_interval"]) == (3.0, [0.55, 0.9])
    # copies of training images are memorised (and classified right), noise is not
    assert guided["memorisation"] == guided["memorisation_nearest"] == guided["accuracy"] == 1.0
    assert unguided["memorisation"] == unguided["memorisation_nearest"] == 0.0
    assert guided["diversity_class0"]["min_nearest_train"] == pytest.approx(0.0, abs=1e-5)
    # the real images' numbers: the held-out images under both thresholds, and real against real
    for key, threshold in (("memorisation_heldout_real", "pair"), ("memorisation_nearest_heldout_real", "nearest")):
        assert report[key] == memorisation(reference.heldout, reference.heldout_labels, reference, threshold)
    # real against real at the samples' count (30 a setting), the draw of seed 0 whatever the sampling seed (the
    # benchmarks report the same floor for the same data): this classifier was fit on every training image
    second = reference.train[np.random.default_rng(0).permutation(len(reference.train))[:30]]
    assert report["fd_real_vs_real_images"] == 30
    assert report["fd_real_vs_real"] == pytest.approx(
        frechet_distance(reference.features(second), reference.features(reference.heldout)))


def test_the_nearest_threshold_is_the_nearest_neighbour_among_the_whole_class():
    """1,000 training images 1 apart on a line: each one's nearest other image of the class is 1 away, so
    the median is 1. Drawn from 300 images only (as the judge did until 2026-12-07), the nearest other one
    would be about 3 away, and new images 1.5 from the line would have counted as memorised."""
    ref = Reference(classifier=None, train=points(np.arange(1000.0)), heldout=points([0.0]),
                    heldout_labels=np.zeros(1), train_labels=np.zeros(1000, int))
    labels = np.zeros(400, int)
    near, farther = points(np.arange(400.0) * 2, y=0.5), points(np.arange(400.0) * 2, y=1.5)
    assert memorisation(near, labels, ref, "nearest") == 1.0      # 0.5 from a training image: < 1
    assert memorisation(farther, labels, ref, "nearest") == 0.0   # 1.5 from it: not < 1


def test_real_fd_compares_as_many_real_images_as_asked():
    from ecar_infer.training.quality import frechet_distance

    rng = np.random.default_rng(0)
    train, heldout = rng.standard_normal((60, 3)), rng.standard_normal((20, 3))
    ref = Reference(classifier=None, train=train, heldout=heldout, heldout_labels=np.zeros(20), fit_size=25)
    ref.features = lambda images: images   # the identity stands in for the PCA
    # the first images the classifier was not fit on, while there are enough of them ...
    assert ref.real_fd(30) == (pytest.approx(frechet_distance(train[25:55], heldout)), 30)
    # ... else a seeded draw from the whole split, at most all of it
    drawn = train[np.random.default_rng(4).permutation(60)[:40]]
    assert ref.real_fd(40, seed=4) == (pytest.approx(frechet_distance(drawn, heldout)), 40)
    assert ref.real_fd(100)[1] == 60
    # the FD of few images sits higher than that of many (why the count must match the samples')
    assert ref.real_fd(10)[0] > ref.real_fd(35)[0]


def colour_npz(folder, name, n, seed, class_names=("red", "green", "blue")):
    images, labels = colour_classes(n, seed)
    np.savez(folder / f"{name}.npz", images=images, labels=labels, class_names=np.array(class_names))
    return str(folder / f"{name}.npz")


def test_the_data_must_name_the_models_classes_in_its_order(tmp_path):
    """Class k of the samples is judged as class k of the data: data of other or reordered classes would give
    numbers that mean nothing, so it is refused; a model without names is not checked."""
    config = ECARConfig.preset("ecar-tiny").replace(latent_channels=3, num_classes=3)
    train, held = colour_npz(tmp_path, "train", 8, 0), colour_npz(tmp_path, "heldout", 4, 1)
    for names in (["red", "green", "blue"], None):
        reference_from_data(train, held, config, str(tmp_path / "cache"), names)
    with pytest.raises(ValueError, match=r"train.npz names its classes red, green, blue but the model's are green, red, "
                                         r"blue: judge a model on the data of its own classes, in their order"):
        reference_from_data(train, held, config, str(tmp_path / "cache"), ["green", "red", "blue"])


def test_a_training_split_smaller_than_the_classifiers_components_is_judged(tmp_path):
    """24 training images: the PCA keeps the 23 components with variance (it needed 40 and failed)."""
    config = ECARConfig.preset("ecar-tiny").replace(latent_channels=3, num_classes=3)
    train, held = colour_npz(tmp_path, "train", 8, 0), colour_npz(tmp_path, "heldout", 4, 1)
    ref = reference_from_data(train, held, config, str(tmp_path / "cache"))
    assert ref.features(ref.heldout).shape == (12, 23)
    assert ref.accuracy(ref.heldout, ref.heldout_labels) > 0.9


def test_quality_cli_says_a_data_error_in_one_line(tmp_path, capsys):
    from ecar_infer.training.quality import main
    from ecar_infer.weights import shipped_checkpoint

    train = colour_npz(tmp_path, "train", 8, 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(shipped_checkpoint("ecar-emoji32")), "--data", train, "--heldout", train])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert err[-1].endswith(f"error: {train}: 3 classes (red: 8 images, green: 8, blue: 8) but the config has "
                            f"num_classes=9; use --set num_classes=3, or point --data at the folder whose sub-folders "
                            f"are the classes"), err


def checkpoint_of_classes(path, class_names):
    """A tiny random 3-channel model whose checkpoint names its classes `class_names`."""
    import json

    from conftest import random_model
    from ecar_infer import save_checkpoint

    config = ECARConfig.preset("ecar-tiny").replace(latent_channels=3, num_classes=len(class_names))
    save_checkpoint(random_model(config, seed=1), path, extra_metadata={"class_names": json.dumps(class_names)})
    return str(path)


def test_quality_cli_refuses_data_of_other_classes_than_the_models(tmp_path, capsys):
    """The command passes the model's class names on: data whose classes are the model's in another order is
    one line with status 2, not numbers that mean nothing."""
    from ecar_infer.training.quality import main

    ckpt = checkpoint_of_classes(tmp_path / "gbr.safetensors", ["green", "blue", "red"])
    train, held = colour_npz(tmp_path, "train", 8, 0), colour_npz(tmp_path, "heldout", 4, 1)
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", ckpt, "--data", train, "--heldout", held])
    assert exit_info.value.code == 2
    assert "but the model's are green, blue, red" in capsys.readouterr().err.splitlines()[-1]


def test_the_judge_takes_a_latent_model_with_its_vae(tmp_path, capsys):
    """A latent model is judged on its decoded images against the data's pixels (the tools had no --vae, and
    such a model was a VAEError traceback)."""
    import json

    from conftest import random_model
    from ecar_infer import save_checkpoint
    from ecar_infer.training.quality import main
    from test_vae import tiny_autoencoder

    config = ECARConfig.preset("ecar-tiny-vae").replace(num_classes=3)
    ckpt = tmp_path / "latent.safetensors"
    save_checkpoint(random_model(config, seed=1), ckpt, extra_metadata={"recommended_steps": "1"})
    tiny_autoencoder().save_pretrained(tmp_path / "vae")
    train, held = colour_npz(tmp_path, "train", 8, 0), colour_npz(tmp_path, "heldout", 4, 1)
    main(["--ckpt", str(ckpt), "--vae", str(tmp_path / "vae"), "--data", train, "--heldout", held, "--per-class", "2"])
    report = json.loads(capsys.readouterr().out)
    assert report["heldout_real_accuracy"] > 0.9   # the real images, read at the model's 32x32 in RGB
    assert set(report["settings"]) == {"no guidance", "recommended"}
    assert all(0 <= row["accuracy"] <= 1 and row["fd_vs_heldout"] > 0 for row in report["settings"].values())


def judging_tools():
    from benchmarks import guidance
    from ecar_infer.training import edit_quality, quality

    return {"quality": (quality.main, []), "edit_quality": (edit_quality.main, []),
            "guidance": (guidance.main, ["--setting", "1:0,1"])}


@pytest.mark.parametrize("tool", ["quality", "edit_quality", "guidance"])
@pytest.mark.parametrize("problem, args, said", [
    ("no such checkpoint", ["--ckpt", "{tmp}/nope.safetensors"], "nope.safetensors"),
    ("a latent model without its VAE", ["--ckpt", "{tmp}/latent.safetensors"], "this model decodes through an SD-VAE"),
    ("per-class 0", ["--per-class", "0"], "argument --per-class"),
    # said as such, before the model is loaded (the usage line names --heldout whatever the error)
    ("--data without --heldout", ["--ckpt", "{tmp}/latent.safetensors", "--data", "{tmp}"],
     "--heldout is needed with --data"),
])
def test_the_judging_tools_say_what_is_wrong_in_one_line(tool, problem, args, said, tmp_path, capsys):
    """A missing checkpoint or VAE was a traceback, and so was --per-class 0 (and 1 for quality)."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny-vae"), seed=1), tmp_path / "latent.safetensors")
    main, extra = judging_tools()[tool]
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(tmp=tmp_path) for arg in args] + extra)
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err) and said in err[-1], err


@pytest.mark.parametrize("tool", ["quality", "edit_quality", "guidance"])
def test_digits32_judges_only_models_of_digits32s_form(tool, capsys):
    """--data digits32 is the default: a model of other images (the emoji model) was sampled, then failed in
    sklearn ("X has 3072 features, but PCA is expecting 1024")."""
    main, extra = judging_tools()[tool]
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", "ecar-emoji32", *extra])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert err[-1].endswith("--data digits32 (the default) judges models of 32x32 grayscale digits in 10 classes; "
                            "give this model's own data with --data and --heldout"), err


def test_the_quality_tool_needs_two_samples_per_class_for_its_pairs(capsys):
    from ecar_infer.training.quality import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--per-class", "1"])
    assert exit_info.value.code == 2
    assert "argument --per-class: must be an integer of at least 2 (the diversity check compares pairs)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("tool, args, said", [
    ("quality", ["--seed", "-1"], "argument --seed: must be an integer in 0..18446744073709551615 (2**64-1), got '-1'"),
    ("quality", ["--seed", str(2 ** 64)], "argument --seed: must be an integer in 0.."),
    ("edit_quality", ["--seed", "-1"], "argument --seed: must be an integer in 0.."),
    ("edit_quality", ["--vary-images", "0"], "argument --vary-images: must be a positive integer, got '0'"),
    ("edit_quality", ["--vary-images", "-1"], "argument --vary-images: must be a positive integer"),
    ("guidance", ["--seed-sets", "0"], "argument --seed-sets: must be a positive integer, got '0'"),
    ("guidance", ["--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
])
def test_the_judging_tools_refuse_seeds_and_counts_out_of_range_before_any_work(tool, args, said, tmp_path, capsys):
    """A negative seed was a traceback after the reference was built, --vary-images -1 varied all images
    but the last, --seed-sets 0 wrote a report of no rows and --threads 0 was torch's RuntimeError: each is
    an argument error, one line and status 2, before the checkpoint is read."""
    main, extra = judging_tools()[tool]
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path / "never-read.safetensors"), *args, *extra])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and said in err[-1], err


def test_the_judging_tools_judge_the_shipped_digits_model_on_digits32_by_default():
    """Without options, quality and edit_quality judge ecar-digits32 on digits32 (no VAE); the guidance
    benchmark, which compares settings of a model the user names, requires --ckpt."""
    import argparse

    from ecar_infer.training.quality import add_judge_arguments
    from ecar_infer.weights import shipped_checkpoint

    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    args = parser.parse_args([])
    assert (args.ckpt, args.vae, args.data, args.heldout) == (str(shipped_checkpoint("ecar-digits32")), None,
                                                              "digits32", None)
    required = argparse.ArgumentParser()
    add_judge_arguments(required, ckpt_required=True)
    with pytest.raises(SystemExit):
        required.parse_args([])
    assert required.parse_args(["--ckpt", "x"]).ckpt == "x"
