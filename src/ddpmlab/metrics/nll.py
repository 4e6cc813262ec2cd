"""Negative log-likelihood in bits/dim: the variational bound of DDPM eq. (5), per image, summed over t exactly or
estimated from a strided subset of timesteps; and its mean with standard error over a set of images."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ddpmlab.conditioning import Cond
from ddpmlab.diffusion.gaussian import VARIANCES
from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.errors import ConfigError
from ddpmlab.objectives.likelihood import prior_bpd, vb_terms_bpd


class BitsPerDim(NamedTuple):
    """Per-image bound and its parts, bits/dim, each [B]: total = prior + kl + decoder."""

    total: Tensor
    prior: Tensor  # L_T
    kl: Tensor  # sum over t of L_{t-1} (estimated when stride > 1)
    decoder: Tensor  # L_0


def strata(T: int, stride: int) -> list[tuple[int, int]]:
    """The KL indices 1..T-1 cut into consecutive blocks [start, stop) of ``stride`` indices (the last may be
    shorter)."""
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ConfigError(f"stride={stride!r} must be a positive integer (1: every timestep, the exact sum)")
    return [(start, min(start + stride, T)) for start in range(1, T, stride)]


@torch.no_grad()
def bits_per_dim(
    denoiser: Denoiser,
    x0: Tensor,
    *,
    stride: int = 1,
    variance: str = "auto",
    clip_x0: bool = True,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> BitsPerDim:
    """The bound for each image of ``x0`` [B,C,H,W] in [-1, 1]. The sum over the T-1 KL terms is stratified: each
    block of ``stride`` timesteps contributes one term, at a t drawn uniformly in the block for every image, times
    the block's length, an unbiased estimate of the sum (exact for stride 1); L_T is exact and L_0 always evaluated.
    Costs 1 + ceil((T-1)/stride) network evaluations per image."""
    diffusion = denoiser.diffusion
    B = x0.shape[0]

    def term(t: Tensor) -> Tensor:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return vb_terms_bpd(denoiser, x0, t, eps, variance=variance, clip_x0=clip_x0, cond=cond)

    decoder = term(torch.zeros(B, device=x0.device, dtype=torch.long))
    kl = torch.zeros(B, device=x0.device)
    for start, stop in strata(diffusion.T, stride):
        t = torch.randint(start, stop, (B,), generator=generator, device=x0.device)
        kl += (stop - start) * term(t)
    prior = prior_bpd(diffusion, x0)
    return BitsPerDim(prior + kl + decoder, prior, kl, decoder)


def mean_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error s / sqrt(n) (s: the sample standard deviation; 0 for a single value)."""
    values = values.double().flatten()
    n = values.numel()
    stderr = float(values.std(correction=1)) / math.sqrt(n) if n > 1 else 0.0
    return float(values.mean()), stderr


def evaluate_bpd(
    denoiser: Denoiser,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_images: int | None = None,
    *,
    stride: int = 1,
    variance: str = "auto",
    clip_x0: bool = True,
    conditional: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    task=None,
) -> dict[str, Any]:
    """Bits/dim on the first ``num_images`` images of ``batches`` ((x0 in [-1, 1], label) pairs; None: all of them):
    of p(x0 | label) for a ``conditional`` model, of p(x0 | image) for a model trained on an image ``task`` (the
    bound given each image's own condition: its low-resolution version, or its masked version with a mask drawn
    from the run's generator).

    Returns ``{"value", "stderr", "n", "seconds", "terms", "protocol"}``: the mean bound, its standard error over
    images (it covers the noise and, for stride > 1, the timestep sampling too: each image's estimate is unbiased
    and independent), the number of images, the wall time, the mean of each term, and how it was measured."""
    if num_images is not None and num_images < 1:
        raise ConfigError(f"num_images={num_images} must be >= 1 (or null for the whole split)")
    if variance not in VARIANCES:
        raise ConfigError(f"variance={variance!r} must be 'small' (beta_tilde), 'large' (beta), 'learned' or 'auto'")
    if variance == "auto":  # the network's own variance where it predicts one (iDDPM eq. 15), else beta
        variance = "learned" if denoiser.learn_sigma else "large"
    if variance == "learned" and not denoiser.learn_sigma:
        raise ConfigError("variance='learned' needs a model trained with model.learn_sigma=true; use small or large")
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    parts: list[BitsPerDim] = []
    n = 0
    start = time.perf_counter()
    for x0, label in batches:
        if num_images is not None and n >= num_images:
            break
        take = x0.shape[0] if num_images is None else min(x0.shape[0], num_images - n)
        x0 = x0[:take].to(device)
        fields = {"labels": label[:take].to(device)} if conditional else {}
        if task is not None:
            fields["image"] = task(x0, generator)
        cond = Cond(**fields) if fields else None
        parts.append(
            bits_per_dim(
                denoiser, x0, stride=stride, variance=variance, clip_x0=clip_x0, cond=cond, generator=generator
            )
        )
        n += take
    seconds = time.perf_counter() - start
    if num_images is not None and n < num_images:
        raise ConfigError(f"asked for num_images={num_images} but the data has only {n}; lower num_images or use null")
    if n == 0:
        raise ConfigError("no images to evaluate")
    per_image = BitsPerDim(*(torch.cat(p).cpu() for p in zip(*parts, strict=True)))
    value, stderr = mean_stderr(per_image.total)
    T = denoiser.diffusion.T
    return {
        "value": value,
        "stderr": stderr,
        "n": n,
        "seconds": seconds,
        "terms": {name: float(v.double().mean()) for name, v in per_image._asdict().items() if name != "total"},
        "protocol": {
            "bound": "DDPM eq. (5): L_T + sum_t L_{t-1} + L_0, in bits/dim",
            "decoder": "discretised Gaussian, DDPM eq. (13): bins of half-width 1/255 on [-1, 1], edge bins to +-inf",
            "variance": {
                "large": "sigma_t^2 = beta_t",
                "small": "sigma_t^2 = beta_tilde_t",
                "learned": "Sigma_theta = exp(v log beta_t + (1 - v) log beta_tilde_t), iDDPM eq. (15)",
            }[variance],
            "clip_x0": clip_x0,
            "T": T,
            "stride": stride,
            "timesteps_per_image": 1 + len(strata(T, stride)),
            "kl_sum": "exact"
            if stride == 1
            else f"stratified: one uniform t per block of {stride}, weighted by the block length",
            "conditional": conditional,
            "image_condition": None if task is None else task.name,
            "seed": seed,
        },
    }
