"""Frechet distances in feature spaces other than Inception's, for data Inception was never meant to judge (8x8
digits, MNIST) or machines without its weights.

FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between Gaussians fitted to the real and the generated
features (Frechet 1957; Dowson & Landau 1982; FID is this on Inception's pool features, Heusel et al. 2017, eq. 6).
The number depends on the feature space, so it is always reported with the space's name and never called FID:

- ``pixels``: the images themselves in [0, 1], flattened (C*H*W-d); meaningful where that is small (8x8 digits:
  64-d) and the covariance is well estimated (more real images than dimensions, checked);
- a noisy classifier's checkpoint (``experiment=classifier_digits`` / ``classifier_mnist``): the penultimate
  features of ``NoisyClassifier`` at t = 0 (its attention-pooled token), a learned space of the domain, the role
  Inception plays for natural images.

Both sides go through the same uint8 quantisation as the images a user saves. The real side's statistics are cached
as ``.npz`` (read with ``allow_pickle=False``: never code), named by the reference set and by a hash of the feature
network's weights, as the Inception features are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_path
from ddpmlab.images import to_model_range


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of the rows of ``features``, in float64 (the unbiased covariance, as FID's)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    Tr((S_a S_b)^(1/2)) is taken as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b: exact, and stable where the covariances are
    singular (the border pixels of digits never change), where a general matrix square root (scipy's ``sqrtm``,
    FID's reference code) warns and loses digits."""
    w, V = linalg.eigh(cov_a)
    sqrt_a = (V * np.sqrt(w.clip(min=0))) @ V.T
    eig = linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_covmean = np.sqrt(eig.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


class FeatureSpace:
    """Pixels in [0, 1], flattened: ``space(uint8 images [N,C,H,W]) -> float64 [N, C*H*W]``."""

    name = "pixels"

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)  # the [C,H,W] the space takes
        self.dim = int(np.prod(self.shape))

    @property
    def label(self) -> str:
        """What the distance is called in tables and files."""
        return f"FD (pixels, {self.dim}-d)"

    def key(self) -> str:
        """Names the space in cache files."""
        return f"pixels{self.dim}"

    def check_images(self, shape: tuple[int, ...], what: str) -> None:
        if tuple(shape) != self.shape:
            raise ConfigError(
                f"{self.label} takes images of {'x'.join(map(str, self.shape))} but {what} are "
                f"{'x'.join(map(str, shape))}: use features of a classifier trained on images of that size"
            )

    def check_real(self, num_real: int) -> None:
        if num_real <= self.dim:
            raise ConfigError(
                f"{self.label} needs more real images than its {self.dim} dimensions to estimate their covariance, "
                f"got {num_real}: use more (num_real) or the features of a classifier (features=<ckpt>)"
            )

    def __call__(self, images: Tensor, batch_size: int = 256, device="cpu") -> np.ndarray:
        return images.reshape(len(images), -1).double().div(255).numpy()


class ClassifierFeatures(FeatureSpace):
    """The penultimate features of a ddpmlab ``NoisyClassifier`` at t = 0 (``NoisyClassifier.features``)."""

    name = "classifier"

    def __init__(self, net: torch.nn.Module, where: str):
        super().__init__((net.in_channels, net.image_size, net.image_size))
        self.net, self.where = net.eval(), where
        self.dim = net.pool.qkv.in_channels

    @property
    def label(self) -> str:
        return f"FD (features of {self.where})"

    def key(self) -> str:
        h = hashlib.sha1()
        for k, v in self.net.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return f"classifier-{h.hexdigest()[:10]}"

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 256, device="cpu") -> np.ndarray:
        self.net.to(device)
        out = []
        for i in range(0, len(images), batch_size):
            x = to_model_range(images[i : i + batch_size].to(device))  # as the classifier was trained: [-1, 1]
            t = torch.zeros(len(x), dtype=torch.long, device=device)
            out.append(self.net.features(x, t).double().cpu())
        return torch.cat(out).numpy()


def feature_space(spec: str, image_shape: tuple[int, ...], where: str) -> FeatureSpace:
    """``pixels`` or the path of a noisy-classifier checkpoint, checked against the images it will judge."""
    if spec == "pixels":
        space = FeatureSpace(image_shape)
    else:
        from ddpmlab.checkpoint import load_checkpoint
        from ddpmlab.stages import classifier_from_checkpoint

        net, _, _ = classifier_from_checkpoint(load_checkpoint(spec), where=where)
        space = ClassifierFeatures(net, spec)
    space.check_images(image_shape, "the model's samples")
    return space


def real_stats(
    space: FeatureSpace, images: Tensor, reference: str, cache_dir: str | Path | None, batch_size=256, device="cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, cov) of the real images' features, read from ``<cache_dir>/<reference>-<space>.npz`` when present."""
    space.check_real(len(images))
    cache = None if cache_dir is None else Path(cache_dir).expanduser() / f"{reference}-{space.key()}.npz"
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            return f["mu"], f["cov"]
    mu, cov = gaussian_stats(space(images, batch_size, device))
    if cache is not None:
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:  # np.savez on a path would append .npz to the temporary name
                np.savez(f, mu=mu, cov=cov, num_images=len(images))
    return mu, cov


def frechet_to_real(
    space: FeatureSpace, fake: Tensor, real_mu: np.ndarray, real_cov: np.ndarray, batch_size=256, device="cpu"
) -> float:
    """FD between the generated uint8 images ``fake`` and the real statistics, in ``space``."""
    return frechet_distance(*gaussian_stats(space(fake, batch_size, device)), real_mu, real_cov)
