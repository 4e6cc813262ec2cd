"""Classifier-free guidance (Ho & Salimans 2022): a Denoiser that mixes the conditional and the unconditional
predictions of one conditional network, so that every sampler guides without knowing it.

The network learnt both terms in one training run: with probability p_uncond a condition was replaced by its null
(``Cond.drop``: the null label, the flagged zero image). At sampling, for guidance weight w >= 0,

    eps_tilde(x_t, c) = (1 + w) eps_hat(x_t, c) - w eps_hat(x_t, null)          (Ho & Salimans 2022, eq. 6)

w = 0 is the plain conditional model; larger w trades diversity for samples that look more like their class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpmlab.conditioning import Cond
from ddpmlab.diffusion.parameterization import Denoiser, DenoiserWrapper, Prediction
from ddpmlab.errors import ConfigError


class GuidedDenoiser(DenoiserWrapper):
    """Wraps a conditional :class:`Denoiser`; ``forward(x_t, t, cond)`` returns the guided Prediction.

    Both terms come from ONE forward pass over the batch [x_t; x_t] with conditions [cond; null] [2B]. x0_hat is
    re-derived from the guided eps_hat (DDPM eq. 4 inverted), so the pair stays consistent whatever the network
    predicts (eps, x0 or v: each is affine in the other at fixed x_t, so guiding eps guides them all alike).
    ``cond=None`` is the unconditional model itself (the null label), unguided.
    """

    def __init__(self, denoiser: Denoiser, w: float):
        super().__init__()
        if not denoiser.num_classes and not getattr(denoiser, "cond_channels", 0) and not denoiser.tokenizer:
            raise ConfigError(
                "classifier-free guidance needs a conditional model: train with model.num_classes=<K> (e.g. "
                "experiment=cond_digits), on an image task or on captions, or sample this checkpoint with guidance=0 "
                "and no labels"
            )
        if not float(w) >= 0:
            raise ConfigError(f"guidance weight w={w} must be >= 0 (0: the conditional model, unguided)")
        self.denoiser, self.w = denoiser, float(w)

    def extra_repr(self) -> str:
        return f"w={self.w}"

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | Tensor | None = None) -> Prediction:
        cond = Cond.of(cond)
        if cond is None:
            return self.denoiser(x_t, t, None)
        if len(cond) != x_t.shape[0] or (cond.labels is not None and cond.labels.shape != (x_t.shape[0],)):
            raise ConfigError(f"cond must hold one condition per sample, {x_t.shape[0]}, got {len(cond)}")
        if self.w == 0:  # eq. 6 at w = 0 is the conditional term alone: skip the unconditional half
            return self.denoiser(x_t, t, cond)
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([cond, cond.null()]))  # [2B,...]
        eps_cond, eps_uncond = both.eps_hat.chunk(2)
        eps_hat = (1 + self.w) * eps_cond - self.w * eps_uncond  # Ho & Salimans 2022, eq. (6)
        var_interp = None if both.var_interp is None else both.var_interp.chunk(2)[0]  # the conditional variance
        return Prediction(eps_hat, self.diffusion.x0_from_eps(x_t, t, eps_hat), var_interp)


def check_labels(labels: Tensor, num_classes: int, batch_size: int) -> None:
    """Class labels for a batch: integers in 0..num_classes-1, one per sample."""
    if labels.dtype.is_floating_point or labels.shape != (batch_size,):
        raise ConfigError(
            f"labels must be {batch_size} integer class indices (one per sample), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ConfigError(
            f"labels must lie in 0..{num_classes - 1} (the model has {num_classes} classes), "
            f"got {int(labels.min())}..{int(labels.max())}"
        )


def cycle_labels(labels: int | list[int] | Tensor | None, num_classes: int, n: int) -> Tensor:
    """``n`` labels cycling through ``labels`` (None: 0, 1, ..., num_classes-1), checked against the model."""
    if labels is None:
        base = torch.arange(num_classes)
    else:
        values = (
            labels.tolist() if isinstance(labels, Tensor) else [labels] if isinstance(labels, int) else list(labels)
        )
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(
                f"labels must be a non-empty list of class indices, e.g. labels=[0,1,2] (or null for all), got {values}"
            )
        base = torch.tensor(values, dtype=torch.long)
    out = base.repeat(-(-n // base.numel()))[:n]
    check_labels(out, num_classes, n)
    return out


def with_guidance(denoiser: Denoiser, labels, guidance: float, n: int) -> tuple[Tensor | None, nn.Module]:
    """(labels [n] or None, the denoiser to sample with), as ``sample.py`` wires ``labels=`` and ``guidance=``.

    A class-conditional denoiser draws ``labels`` cycled over the n samples (None: every class in turn) with
    guidance weight ``guidance`` (w of eq. 6); an unconditional one is returned as it is, and refuses both."""
    guidance = float(guidance or 0.0)
    if not denoiser.num_classes:
        if labels is not None or guidance != 0:
            raise ConfigError(
                "labels= and guidance= need a class-conditional checkpoint (trained with model.num_classes, e.g. "
                "experiment=cond_digits); this one is unconditional: drop them"
            )
        return None, denoiser
    return cycle_labels(labels, denoiser.num_classes, n), GuidedDenoiser(denoiser, guidance)
