"""Sample quality of a class-conditional model, judged by an independent classifier trained on the real
training split of its data set (digits32, or any ecar-train data source with a held-out split).

The classifier is scikit-learn's PCA (whitened) + RBF SVM on raw pixels, fit on the training split.
Its PCA features are the feature space of the Frechet distance (FD): mean and covariance of the features
of two image sets, FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)). Memorisation is the share of
images whose nearest training image (pixel distance) is closer than the median distance between two
real training images of their class, reported for the samples next to the same share for real held-out
images (which the model never saw); and, because that share saturates near 1 on data sets with many
images per class, the same with the median distance from a real image to its nearest neighbour.

    python -m ecar_infer.training.quality [--ckpt weights/ecar-digits32.safetensors] [--per-class 100]
    python -m ecar_infer.training.quality --ckpt emoji.safetensors --data emoji32.npz --heldout emoji32-heldout.npz

prints the held-out accuracy of real images, the accuracy, FD and memorisation share of generated images
without guidance and at the checkpoint's recommended settings (its recommended steps per stage, or
--steps N), the FD of real images against real
images, and the diversity statistics that tests/test_quality.py checks.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace

import numpy as np

from .digits import NUM_CLASSES, build_split

PCA_COMPONENTS = 40
CLASSIFIER_TRAIN_SIZE = 4000
MEDIAN_PAIRS_PER_CLASS = 300   # real images per class whose pairwise distances give the class median


@dataclass
class Reference:
    """The classifier and the real images it is judged against."""

    classifier: object            # sklearn Pipeline: PCA -> SVC on flattened pixels
    train: np.ndarray             # [N, D] the real training images (for nearest-neighbour checks)
    heldout: np.ndarray           # [M, D]
    heldout_labels: np.ndarray
    train_labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.classifier[:-1].transform(flat(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.classifier.predict(flat(images)) == labels).mean())


def flat(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] (or [N, D]) images in [-1, 1] -> [N, D] float64."""
    return images.reshape(len(images), -1).astype(np.float64)


def fit_reference(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray, y_held: np.ndarray,
                  class_names: list[str] | None = None) -> Reference:
    """Fit the classifier on (x_train, y_train): images [N, C, H, W] in [-1, 1]."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    classifier = make_pipeline(PCA(PCA_COMPONENTS, whiten=True, random_state=0), SVC(C=10.0, gamma="scale"))
    classifier.fit(flat(x_train), y_train)
    return Reference(classifier, flat(x_train), flat(x_held), y_held, y_train, class_names or [])


def build_reference(train_size: int = CLASSIFIER_TRAIN_SIZE, heldout_size: int = 2000) -> Reference:
    """The digits32 reference: the first train_size training images, heldout_size held-out images."""
    x_train, y_train = build_split("train", train_size)
    x_held, y_held = build_split("heldout", heldout_size)
    return fit_reference(x_train, y_train, x_held, y_held, [str(d) for d in range(NUM_CLASSES)])


def reference_from_data(train: str, heldout: str, config, cache_dir: str) -> Reference:
    """The reference of any data set ecar-train reads (ecar_infer/training/data.py): the classifier is fit
    on the whole training split, at the model's image size."""
    from .data import open_data

    x_train, x_held = (open_data(spec, config, cache_dir) for spec in (train, heldout))
    if x_held.class_names != x_train.class_names:
        raise ValueError(f"{heldout} and {train} name their classes differently")
    return fit_reference(x_train.images(np.arange(len(x_train))).numpy(), np.asarray(x_train.labels),
                         x_held.images(np.arange(len(x_held))).numpy(), np.asarray(x_held.labels),
                         x_train.class_names)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fit to feature sets a [N, F] and b [M, F]."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (np.atleast_2d(np.cov(x, rowvar=False)) for x in (a, b))  # [F, F], also for F = 1
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] Euclidean distances between the rows of a and b."""
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def off_diagonal(d: np.ndarray) -> np.ndarray:
    """The entries of a square matrix that are not on its diagonal (distances between distinct items)."""
    return d[~np.eye(len(d), dtype=bool)]


def diversity(samples: np.ndarray, real: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Distances between images of ONE class: the closest pair of samples and the median real pair
    (collapse check), and the closest training image to any sample (copying check)."""
    samples, real = flat(samples), flat(real)
    return {"min_sample_pair": float(off_diagonal(pairwise_distances(samples, samples)).min()),
            "median_real_pair": float(np.median(off_diagonal(pairwise_distances(real, real)))),
            "min_nearest_train": float(pairwise_distances(samples, train).min())}


def memorisation(images: np.ndarray, labels: np.ndarray, ref: Reference, threshold: str = "pair",
                 seed: int = 0) -> float:
    """The share of `images` whose nearest training image is closer than a typical distance within their
    class, from at most MEDIAN_PAIRS_PER_CLASS real training images per class:

    threshold="pair": the median distance between two real images of the class (issue 9's definition;
    with many images per class the nearest neighbour of almost any image is closer, so it saturates);
    threshold="nearest": the median distance from a real image to its nearest other real image of the
    class (about half of new real images fall under it, and copies all do).
    """
    rng = np.random.default_rng(seed)
    images = flat(images)
    nearest = np.concatenate([pairwise_distances(images[i:i + 256], ref.train).min(1)
                              for i in range(0, len(images), 256)])
    close = np.zeros(len(images), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(ref.train_labels == c)
        members = rng.choice(members, min(len(members), MEDIAN_PAIRS_PER_CLASS), replace=False)
        if len(members) < 2:
            continue
        d = pairwise_distances(ref.train[members], ref.train[members])
        if threshold == "pair":
            typical = np.median(off_diagonal(d))
        else:
            np.fill_diagonal(d, np.inf)
            typical = np.median(d.min(1))
        close[labels == c] = nearest[labels == c] < typical
    return float(close.mean())


def generate(sampler, per_class: int, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """per_class samples of every class: ([N, C, H, W] in [-1, 1], labels [N])."""
    labels = np.repeat(np.arange(sampler.config.num_classes), per_class)
    out = sampler.generate(labels.tolist(), seed=seed, output_type="np", progress=False, **kwargs)
    images = out.images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return images, labels


def evaluate(sampler, ref: Reference | None = None, per_class: int = 100, seed: int = 10_000,
             second_real: np.ndarray | None = None) -> dict:
    """The quality report. Without `ref`, the digits32 reference; second_real: real images the classifier
    did not see, for the real-vs-real FD (digits32: more training images; otherwise the training images)."""
    if ref is None:
        ref = build_reference()
        second_real, _ = build_split("train", CLASSIFIER_TRAIN_SIZE + len(ref.heldout))
        second_real = second_real[CLASSIFIER_TRAIN_SIZE:]
    if second_real is None:
        second_real = ref.train[np.random.default_rng(seed).permutation(len(ref.train))[:len(ref.heldout)]]
    real_feats = ref.features(ref.heldout)
    report = {"heldout_real_accuracy": ref.accuracy(ref.heldout, ref.heldout_labels),
              "fd_real_vs_real": frechet_distance(ref.features(second_real), real_feats),
              "memorisation_heldout_real": memorisation(ref.heldout, ref.heldout_labels, ref),
              "memorisation_nearest_heldout_real": memorisation(ref.heldout, ref.heldout_labels, ref, "nearest"),
              "settings": {}}
    defaults = sampler.defaults
    probe = 3 if sampler.config.num_classes > 3 else 0   # the class of the diversity check
    for name, cfg in (("no guidance", 1.0), ("recommended", defaults.cfg_scale)):
        images, labels = generate(sampler, per_class, seed, cfg_scale=cfg)
        report["settings"][name] = {
            "cfg_scale": cfg, "cfg_schedule": defaults.cfg_schedule, "steps": str(defaults.steps_per_stage),
            "cfg_interval": list(defaults.cfg_interval) if cfg != 1.0 and defaults.cfg_interval else None,
            "accuracy": ref.accuracy(images, labels),
            "fd_vs_heldout": frechet_distance(ref.features(images), real_feats),
            "memorisation": memorisation(images, labels, ref),
            "memorisation_nearest": memorisation(images, labels, ref, "nearest"),
            f"diversity_class{probe}": diversity(images[labels == probe],
                                                 ref.heldout[ref.heldout_labels == probe][:per_class], ref.train)}
    return report


def main(argv: list[str] | None = None) -> None:
    import tempfile

    from ..cpu_memory import keep_freed_memory
    from ..sampler import Sampler
    from ..schedule import plan_for
    from ..weights import shipped_checkpoint

    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=str(shipped_checkpoint("ecar-digits32")))
    parser.add_argument("--data", default="digits32", help="the training split (any ecar-train --data)")
    parser.add_argument("--heldout", help="the held-out split (needed unless --data is digits32)")
    parser.add_argument("--per-class", type=int, default=100, help="generated images per class and setting")
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--steps", type=int, help="steps per stage (default: the checkpoint's recommended)")
    args = parser.parse_args(argv)
    sampler = Sampler.from_pretrained(args.ckpt, device="cpu", progress=False)
    if args.steps is not None:
        try:
            plan_for(sampler.config, args.steps)   # a count this head cannot take is a usage error
        except ValueError as err:
            parser.error(f"--steps: {err}")
        sampler.defaults = replace(sampler.defaults, steps_per_stage=args.steps)
    ref = None
    if args.data != "digits32":
        if not args.heldout:
            parser.error("--heldout is needed with --data")
        with tempfile.TemporaryDirectory() as cache:
            ref = reference_from_data(args.data, args.heldout, sampler.config, cache)
    print(json.dumps(evaluate(sampler, ref, args.per_class, args.seed), indent=1))


if __name__ == "__main__":
    main()
