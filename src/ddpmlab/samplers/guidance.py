"""Classifier-free guidance (Ho & Salimans 2022): a Denoiser that mixes the conditional and the unconditional
predictions of one conditional network, so that every sampler guides without knowing it.

The network learnt both terms in one training run: with probability p_uncond a condition was replaced by its null
(``Cond.drop``: the null label, the flagged zero image). At sampling, for guidance weight w >= 0,

    eps_tilde(x_t, c) = (1 + w) eps_hat(x_t, c) - w eps_hat(x_t, null)          (Ho & Salimans 2022, eq. 6)

w = 0 is the plain conditional model; larger w trades diversity for samples that look more like their class.

Guidance rescale phi (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Sec. 3.4)
pulls the guided output's per-sample std back towards the conditional one's, against the over-exposure a large w
gives (worst at zero terminal SNR):

    x_rescaled = x_cfg * std(x_pos) / std(x_cfg)                                      (eq. 15)
    x_final    = phi x_rescaled + (1 - phi) x_cfg                                      (eq. 16)

x is what the network predicts (``Denoiser.output_of``): v for the paper's v-prediction model, eps for an
eps-model. diffusers' ``rescale_noise_cfg`` does the same: its ``noise_pred`` is the UNet's raw output, v for
v-prediction checkpoints. Unlike the mix of eq. 6, the rescale is not affine, so the space matters; the output
space is where both define it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpmlab.conditioning import Cond
from ddpmlab.diffusion.parameterization import Denoiser, DenoiserWrapper, Prediction
from ddpmlab.errors import ConfigError


class GuidedDenoiser(DenoiserWrapper):
    """Wraps a conditional :class:`Denoiser`; ``forward(x_t, t, cond)`` returns the guided Prediction.

    Both terms come from ONE forward pass over the batch [x_t; x_t] with conditions [cond; null] [2B]. eps_hat and
    x0_hat are mixed alike, so the pair stays consistent whatever the network predicts (eps, x0 or v: each is
    affine in the other at fixed x_t, so guiding eps guides them all alike).
    ``cond=None`` is the unconditional model itself (the null label), unguided. ``rescale`` is phi of Lin et al.
    2024, eq. (16), in [0, 1] (0: plain guidance; the paper uses 0.7).
    """

    def __init__(self, denoiser: Denoiser, w: float, rescale: float = 0.0):
        super().__init__()
        if not denoiser.num_classes and not getattr(denoiser, "cond_channels", 0) and not denoiser.tokenizer:
            raise ConfigError(
                "classifier-free guidance needs a conditional model: train with model.num_classes=<K> (e.g. "
                "experiment=cond_digits), on an image task or on captions, or sample this checkpoint with guidance=0 "
                "and no labels"
            )
        if not float(w) >= 0:
            raise ConfigError(f"guidance weight w={w} must be >= 0 (0: the conditional model, unguided)")
        self.denoiser, self.w, self.rescale = denoiser, float(w), check_rescale(rescale)

    def extra_repr(self) -> str:
        return f"w={self.w}, rescale={self.rescale}"

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | Tensor | None = None) -> Prediction:
        cond = Cond.of(cond)
        if cond is None:
            return self.denoiser(x_t, t, None)
        if len(cond) != x_t.shape[0] or (cond.labels is not None and cond.labels.shape != (x_t.shape[0],)):
            raise ConfigError(f"cond must hold one condition per sample, {x_t.shape[0]}, got {len(cond)}")
        if self.w == 0:  # eq. 6 at w = 0 is the conditional term alone: skip the unconditional half
            return self.denoiser(x_t, t, cond)
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([cond, cond.null()]))  # [2B,...]
        (eps_cond, eps_uncond), (x0_cond, x0_uncond) = both.eps_hat.chunk(2), both.x0_hat.chunk(2)
        var_interp = None if both.var_interp is None else both.var_interp.chunk(2)[0]  # the conditional variance
        # Ho & Salimans 2022, eq. (6), on eps and alike on x0: at fixed x_t both are affine in the network's output
        # with the same coefficients, so the pair stays consistent without dividing by sqrt(alpha_bar_t), which
        # is 0 at zero terminal SNR.
        guided = Prediction(
            (1 + self.w) * eps_cond - self.w * eps_uncond, (1 + self.w) * x0_cond - self.w * x0_uncond, var_interp
        )
        if self.rescale == 0:
            return guided
        x_pos = self.denoiser.output_of(Prediction(eps_cond, x0_cond), x_t, t)  # [B,C,H,W]
        x_cfg = self.denoiser.output_of(guided, x_t, t)
        dims = list(range(1, x_cfg.ndim))
        x_rescaled = x_cfg * x_pos.std(dims, keepdim=True) / x_cfg.std(dims, keepdim=True)  # Lin et al. eq. (15)
        x_final = self.rescale * x_rescaled + (1 - self.rescale) * x_cfg  # eq. (16)
        return self.denoiser.prediction_of(x_final, x_t, t, var_interp)


def check_rescale(rescale: float) -> float:
    """Guidance rescale phi (Lin et al. 2024, eq. 16) as a float in [0, 1]."""
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
        raise ConfigError(
            f"guidance_rescale={rescale!r} must be a number in [0, 1] (Lin et al. 2024 eq. 16: 0 is plain guidance, "
            f"1 keeps the conditional prediction's std; the paper uses 0.7)"
        )
    return float(rescale)


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


def with_guidance(
    denoiser: Denoiser, labels, guidance: float, n: int, rescale: float = 0.0
) -> tuple[Tensor | None, nn.Module]:
    """(labels [n] or None, the denoiser to sample with), as ``sample.py`` wires ``labels=``, ``guidance=`` and
    ``guidance_rescale=``.

    A class-conditional denoiser draws ``labels`` cycled over the n samples (None: every class in turn) with
    guidance weight ``guidance`` (w of eq. 6) and rescale ``rescale`` (phi); an unconditional one is returned as it
    is, and refuses labels and guidance."""
    guidance, rescale = float(guidance or 0.0), check_rescale(rescale or 0.0)
    if not denoiser.num_classes:
        if labels is not None or guidance != 0:
            raise ConfigError(
                "labels= and guidance= need a class-conditional checkpoint (trained with model.num_classes, e.g. "
                "experiment=cond_digits); this one is unconditional: drop them"
            )
        return None, denoiser
    return cycle_labels(labels, denoiser.num_classes, n), GuidedDenoiser(denoiser, guidance, rescale)
