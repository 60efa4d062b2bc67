"""Sample quality of a class-conditional model, judged by an independent classifier trained on the real
training split of its data set (digits32, or any ecar-train data source with a held-out split).

The classifier is scikit-learn's PCA (whitened) + RBF SVM on raw pixels, fit on the training split
(digits32: its first 4,000 images). Its PCA features are the feature space of the Frechet distance (FD):
mean and covariance of the features of two image sets, FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)).
The FD of two finite samples of one distribution is not 0 and grows as the samples shrink, so a sample
set's FD is read against the FD of as many real images (`Reference.real_fd`), never against a real
baseline of another size.

Memorisation is the share of images whose nearest training image (pixel distance, searched over the
whole training split the model learnt from) is closer than the median distance between two real training
images of their class, reported for the samples next to the same share for real held-out images (which
the model never saw); and, because that share saturates near 1 on data sets with many images per class,
the same with the median distance from a real image to its nearest other image of its whole class.

    python -m ecar_infer.training.quality [--ckpt weights/ecar-digits32.safetensors] [--per-class 100]
    python -m ecar_infer.training.quality --ckpt emoji.safetensors --data emoji32.npz --heldout emoji32-heldout.npz

prints the held-out accuracy of real images, the accuracy, FD and memorisation share of generated images
without guidance and at the checkpoint's recommended settings (its recommended steps per stage, or
--steps N), the FD of as many real images as samples against the same held-out images, and the diversity
statistics that tests/test_quality.py checks.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace

import numpy as np

from ..checks import some_of
from .digits import NUM_CLASSES, build_split

PCA_COMPONENTS = 40
CLASSIFIER_TRAIN_SIZE = 4000
THRESHOLD_IMAGES_PER_CLASS = 300   # real images per class drawn to estimate a class's median distance
CHUNK_ROWS = 256                   # images per block of a distance matrix (bounded memory)


@dataclass
class Reference:
    """The classifier and the real images it is judged against."""

    classifier: object            # sklearn Pipeline: PCA -> SVC on flattened pixels
    train: np.ndarray             # [N, D] every real training image the model learnt from (nearest-neighbour checks)
    heldout: np.ndarray           # [M, D]
    heldout_labels: np.ndarray
    train_labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    fit_size: int | None = None   # the classifier was fit on train[:fit_size] (None: on all of it)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.classifier[:-1].transform(flat(images))

    def real_fd(self, count: int, seed: int = 0) -> tuple[float, int]:
        """(FD, images used) of `count` real training images against the held-out images: the value an FD of
        `count` samples is to be read against. The images are the first ones the classifier was not fit on
        where there are `count` of them (digits32), else a seeded draw from the whole training split (at
        most all of it)."""
        unseen = self.train[self.fit_size:] if self.fit_size is not None else self.train[:0]
        if len(unseen) >= count:
            real = unseen[:count]
        else:
            real = self.train[np.random.default_rng(seed).permutation(len(self.train))[:count]]
        return frechet_distance(self.features(real), self.features(self.heldout)), len(real)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.classifier.predict(flat(images)) == labels).mean())


def flat(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] (or [N, D]) images in [-1, 1] -> [N, D] float64."""
    return images.reshape(len(images), -1).astype(np.float64)


def fit_reference(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray, y_held: np.ndarray,
                  class_names: list[str] | None = None, fit_size: int | None = None) -> Reference:
    """Fit the classifier on the first fit_size (default: all) of (x_train, y_train): images [N, C, H, W]
    in [-1, 1]. All of x_train is the training split the memorisation checks search."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    fit = flat(x_train[:fit_size])
    # a split of n images has n - 1 components with variance (the mean is taken out): whitening one more
    # would blow up a zero-variance direction
    components = min(PCA_COMPONENTS, len(fit) - 1, fit.shape[1])
    classifier = make_pipeline(PCA(components, whiten=True, random_state=0), SVC(C=10.0, gamma="scale"))
    classifier.fit(fit, y_train[:fit_size])
    return Reference(classifier, flat(x_train), flat(x_held), y_held, y_train, class_names or [], fit_size)


def build_reference(train_size: int = CLASSIFIER_TRAIN_SIZE, heldout_size: int = 2000,
                    split_size: int | None = None) -> Reference:
    """The digits32 reference: the classifier fit on the first train_size training images, judged on
    heldout_size held-out images; the nearest-neighbour checks search the first split_size training images
    (default: the whole split, the 20,000 images ecar-train reads)."""
    x_train, y_train = build_split("train", split_size)
    if len(x_train) < train_size:
        raise ValueError(f"split_size {len(x_train)} is smaller than train_size {train_size}")
    x_held, y_held = build_split("heldout", heldout_size)
    return fit_reference(x_train, y_train, x_held, y_held, [str(d) for d in range(NUM_CLASSES)], train_size)


def reference_from_data(train: str, heldout: str, config, cache_dir: str,
                        model_class_names: list[str] | None = None) -> Reference:
    """The reference of any data set ecar-train reads (ecar_infer/training/data.py): the classifier is fit
    on the whole training split, at the model's image size. The splits must name their classes as the
    model does (model_class_names, where it has names): class k of the samples is judged as class k of the
    data, so other or reordered classes would give numbers that mean nothing."""
    from ..editing import image_channels
    from .data import open_data

    # a latent model is judged on its decoded images: the data's pixels, in the VAE's channels
    channels = None if config.latent_kind == "pixel" else image_channels(config)
    x_train, x_held = (open_data(spec, config, cache_dir, channels) for spec in (train, heldout))
    if x_held.class_names != x_train.class_names:
        raise ValueError(f"{heldout} and {train} name their classes differently")
    if model_class_names is not None and model_class_names != x_train.class_names:
        raise ValueError(f"{train} names its classes {some_of(x_train.class_names, 5)} but the model's are "
                         f"{some_of(model_class_names, 5)}: judge a model on the data of its own classes, in "
                         f"their order")
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


def nearest_distances(images: np.ndarray, pool: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """[N] distance from each row of images [N, D] to its nearest row of pool [P, D], in blocks of CHUNK_ROWS
    images; own[i], where given, is the row of pool that is image i itself, which does not count."""
    out = np.empty(len(images))
    for start in range(0, len(images), CHUNK_ROWS):
        d = pairwise_distances(images[start:start + CHUNK_ROWS], pool)
        if own is not None:
            d[np.arange(len(d)), own[start:start + CHUNK_ROWS]] = np.inf
        out[start:start + CHUNK_ROWS] = d.min(1)
    return out


def diversity(samples: np.ndarray, real: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Distances between images of ONE class: the closest pair of samples and the median real pair
    (collapse check), and the closest training image to any sample (copying check)."""
    samples, real = flat(samples), flat(real)
    return {"min_sample_pair": float(off_diagonal(pairwise_distances(samples, samples)).min()),
            "median_real_pair": float(np.median(off_diagonal(pairwise_distances(real, real)))),
            "min_nearest_train": float(nearest_distances(samples, train).min())}


def memorisation(images: np.ndarray, labels: np.ndarray, ref: Reference, threshold: str = "pair",
                 seed: int = 0) -> float:
    """The share of `images` whose nearest image of the whole training split is closer than a typical
    distance within their class, a median over at most THRESHOLD_IMAGES_PER_CLASS real training images of
    the class drawn at random:

    threshold="pair": the median distance between two of the drawn images (issue 9's definition; with many
    images per class the nearest neighbour of almost any image is closer, so it saturates);
    threshold="nearest": the median distance from a drawn image to its nearest other image of the whole
    class (searched as the images' nearest neighbours are, so that about half of new real images fall
    under it; copies all do).
    """
    rng = np.random.default_rng(seed)
    nearest = nearest_distances(flat(images), ref.train)
    close = np.zeros(len(images), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(ref.train_labels == c)
        if len(members) < 2:
            continue
        drawn = np.sort(rng.choice(members, min(len(members), THRESHOLD_IMAGES_PER_CLASS), replace=False))
        if threshold == "pair":
            typical = np.median(off_diagonal(pairwise_distances(ref.train[drawn], ref.train[drawn])))
        else:
            typical = np.median(nearest_distances(ref.train[drawn], ref.train[members],
                                                  own=np.searchsorted(members, drawn)))
        close[labels == c] = nearest[labels == c] < typical
    return float(close.mean())


def generate(sampler, per_class: int, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """per_class samples of every class: ([N, C, H, W] in [-1, 1], labels [N])."""
    labels = np.repeat(np.arange(sampler.config.num_classes), per_class)
    out = sampler.generate(labels.tolist(), seed=seed, output_type="np", progress=False, **kwargs)
    images = out.images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return images, labels


def evaluate(sampler, ref: Reference | None = None, per_class: int = 100, seed: int = 10_000) -> dict:
    """The quality report. Without `ref`, the digits32 reference."""
    if ref is None:
        ref = build_reference()
    real_feats = ref.features(ref.heldout)
    fd_real, real_count = ref.real_fd(per_class * sampler.config.num_classes)   # the draw benchmarks/ makes too
    report = {"heldout_real_accuracy": ref.accuracy(ref.heldout, ref.heldout_labels),
              "fd_real_vs_real": fd_real, "fd_real_vs_real_images": real_count,
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


def add_judge_arguments(parser: argparse.ArgumentParser, ckpt_required: bool = False) -> None:
    """The options every judging tool takes: the model (--ckpt, --vae) and its data (--data, --heldout)."""
    from ..weights import shipped_checkpoint

    if ckpt_required:
        parser.add_argument("--ckpt", required=True, help="checkpoint file or shipped model name")
    else:
        parser.add_argument("--ckpt", default=str(shipped_checkpoint("ecar-digits32")),
                            help="checkpoint file or shipped model name (default: ecar-digits32)")
    parser.add_argument("--vae", help="a latent model's VAE: a local diffusers AutoencoderKL, as ecar-sample takes it")
    parser.add_argument("--data", default="digits32", help="the training split (any ecar-train --data)")
    parser.add_argument("--heldout", help="the held-out split (needed unless --data is digits32)")


def judged_model(parser: argparse.ArgumentParser, args):
    """The sampler of --ckpt and --vae (on the CPU, quiet); what is wrong with them, or with --data and
    --heldout together, is one parser error."""
    from ..sampler import Sampler

    if args.data != "digits32" and not args.heldout:
        parser.error("--heldout is needed with --data")
    try:
        return Sampler.from_pretrained(args.ckpt, device="cpu", progress=False, vae=args.vae)
    except ValueError as err:   # CheckpointError, ConfigError, VAEError
        parser.error(str(err))


def judge_of_data(parser: argparse.ArgumentParser, args, sampler) -> Reference | None:
    """The reference of --data and --heldout; None for digits32, whose reference each tool builds as it
    needs. The data's errors and a misfit of classes are one parser error."""
    import tempfile

    if args.data == "digits32":
        config = sampler.config
        if (config.latent_kind, config.latent_channels, config.image_size, config.num_classes) != ("pixel", 1, 32, 10):
            parser.error("--data digits32 (the default) judges models of 32x32 grayscale digits in 10 classes; give "
                         "this model's own data with --data and --heldout")
        return None
    with tempfile.TemporaryDirectory() as cache:
        try:
            return reference_from_data(args.data, args.heldout, sampler.config, cache, sampler.class_names)
        except ValueError as err:   # the data's errors (DataError too) and a misfit of classes
            parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    from ..command import checked, seed_int
    from ..cpu_memory import keep_freed_memory
    from ..schedule import plan_for

    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_judge_arguments(parser)
    parser.add_argument("--per-class", type=checked(int, lambda v: v >= 2, "an integer of at least 2 (the "
                                                    "diversity check compares pairs)"), default=100,
                        help="generated images per class and setting")
    parser.add_argument("--seed", type=seed_int, default=10_000)
    parser.add_argument("--steps", type=int, help="steps per stage (default: the checkpoint's recommended)")
    args = parser.parse_args(argv)
    sampler = judged_model(parser, args)
    if args.steps is not None:
        try:
            plan_for(sampler.config, args.steps)   # a count this head cannot take is a usage error
        except ValueError as err:
            parser.error(f"--steps: {err}")
        sampler.defaults = replace(sampler.defaults, steps_per_stage=args.steps)
    ref = judge_of_data(parser, args, sampler)
    print(json.dumps(evaluate(sampler, ref, args.per_class, args.seed), indent=1))


if __name__ == "__main__":
    main()
