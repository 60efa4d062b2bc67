"""Sample quality of a digits32 model, judged by an independent classifier trained on real images.

The classifier is scikit-learn's PCA (whitened) + RBF SVM on raw pixels, fit on the digits32 train split.
Its PCA features are the feature space of the Frechet distance (FD): mean and covariance of the features
of two image sets, FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)).

    python -m ecar_infer.training.quality [--ckpt weights/ecar-digits32.safetensors] [--per-class 100]

prints the held-out accuracy of real images, the accuracy and FD of generated images without guidance
and at the checkpoint's recommended settings, the FD of real images against real images, and the
diversity statistics that tests/test_quality.py checks.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np

from .digits import NUM_CLASSES, build_split

PCA_COMPONENTS = 40
CLASSIFIER_TRAIN_SIZE = 4000


@dataclass
class Reference:
    """The classifier and the real images it is judged against."""

    classifier: object            # sklearn Pipeline: flatten -> PCA -> SVC
    train: np.ndarray             # [N, 1024] the real training images (for nearest-neighbour checks)
    heldout: np.ndarray           # [M, 1024]
    heldout_labels: np.ndarray

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.classifier[:-1].transform(flat(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.classifier.predict(flat(images)) == labels).mean())


def flat(images: np.ndarray) -> np.ndarray:
    """[N, 1, H, W] (or [N, H*W]) images in [-1, 1] -> [N, H*W] float64."""
    return images.reshape(len(images), -1).astype(np.float64)


def build_reference(train_size: int = CLASSIFIER_TRAIN_SIZE, heldout_size: int = 2000) -> Reference:
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    x_train, y_train = build_split("train", train_size)
    x_held, y_held = build_split("heldout", heldout_size)
    classifier = make_pipeline(PCA(PCA_COMPONENTS, whiten=True, random_state=0), SVC(C=10.0, gamma="scale"))
    classifier.fit(flat(x_train), y_train)
    return Reference(classifier, flat(x_train), flat(x_held), y_held)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fit to feature sets a [N, F] and b [M, F]."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
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


def generate(sampler, per_class: int, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """per_class samples of every class: ([N, 1, H, W] in [-1, 1], labels [N])."""
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    out = sampler.generate(labels.tolist(), seed=seed, output_type="np", progress=False, **kwargs)
    images = out.images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return images, labels


def evaluate(sampler, per_class: int = 100, seed: int = 10_000) -> dict:
    ref = build_reference()
    real_feats = ref.features(ref.heldout)
    second_real, _ = build_split("train", CLASSIFIER_TRAIN_SIZE + len(ref.heldout))
    second_real = second_real[CLASSIFIER_TRAIN_SIZE:]   # real images the classifier did not see
    report = {"heldout_real_accuracy": ref.accuracy(ref.heldout, ref.heldout_labels),
              "fd_real_vs_real": frechet_distance(ref.features(second_real), real_feats), "settings": {}}
    defaults = sampler.defaults
    for name, cfg in (("no guidance", 1.0), ("recommended", defaults.cfg_scale)):
        images, labels = generate(sampler, per_class, seed, cfg_scale=cfg)
        report["settings"][name] = {
            "cfg_scale": cfg, "cfg_schedule": defaults.cfg_schedule, "steps": str(defaults.steps_per_stage),
            "accuracy": ref.accuracy(images, labels),
            "fd_vs_heldout": frechet_distance(ref.features(images), real_feats),
            "diversity_class3": diversity(images[labels == 3], ref.heldout[ref.heldout_labels == 3][:per_class],
                                          ref.train)}
    return report


def main(argv: list[str] | None = None) -> None:
    from ..sampler import Sampler
    from ..weights import default_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=str(default_checkpoint()))
    parser.add_argument("--per-class", type=int, default=100, help="generated images per class and setting")
    parser.add_argument("--seed", type=int, default=10_000)
    args = parser.parse_args(argv)
    sampler = Sampler.from_pretrained(args.ckpt, device="cpu", progress=False)
    print(json.dumps(evaluate(sampler, args.per_class, args.seed), indent=1))


if __name__ == "__main__":
    main()
