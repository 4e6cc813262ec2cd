"""The Denoiser contract: one network output (eps, x0 or v) -> Prediction(eps_hat, x0_hat[, var_interp]).

A network built with ``learn_sigma`` outputs 2C channels: the prediction, then v (iDDPM eq. 15), so that
Sigma_theta = exp(v log beta_t + (1 - v) log beta_tilde_t); the Prediction then carries v as ``var_interp``.

Every loss and every sampler talks to the network only through this.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ddpmlab.conditioning import Cond
from ddpmlab.diffusion.gaussian import GaussianDiffusion, extract
from ddpmlab.errors import ConfigError

PredictionType = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")
# Lin et al. 2024, Sec. 3.2: at zero terminal SNR an eps-prediction is the identity at T and says nothing of x0.
ZERO_SNR_NEEDS_V = (
    "schedule.zero_terminal_snr=true needs prediction=v (or x0): at alpha_bar_T = 0, x_T holds no signal and an "
    "eps-prediction cannot recover x0 = (x_T - sqrt(1 - alpha_bar_T) eps) / sqrt(alpha_bar_T); set prediction=v"
)


class Prediction(NamedTuple):
    eps_hat: Tensor  # [B,C,H,W]
    x0_hat: Tensor  # [B,C,H,W]
    # iDDPM eq. (15)'s v [B,C,H,W] for a learned variance (None: fixed variance). The network's raw output r lies
    # roughly in [-1, 1] and v = (r + 1) / 2, as improved-diffusion parameterises it.
    var_interp: Tensor | None = None
    # s * grad_{x_t} log p_phi(y | x_t) from a noisy classifier (classifier guidance; None: unguided). Ancestral
    # sampling shifts its mean by Sigma times it, other samplers shift eps_hat (Dhariwal & Nichol 2021, Alg. 1, 2).
    guide_grad: Tensor | None = None


class Denoiser(nn.Module):
    """Wraps ``net(x_t, t[, cond])`` whose output is ``prediction`` (eps: DDPM eq. 11; x0; v: Salimans & Ho 2022).

    ``cond`` is a :class:`~ddpmlab.conditioning.Cond` (a tensor of class labels is taken as ``Cond(labels=...)``).
    The denoiser also says what it samples: ``sample_shape`` (C, H, W) of one x_t, ``num_classes`` (None for a
    model without classes; a class-conditional one takes labels 0..num_classes-1) and ``cond_channels`` (0, or the
    channels of the image it is conditioned on). They default to the network's ``in_channels`` / ``image_size`` /
    ``num_classes`` / ``cond_channels``; pass ``sample_shape`` for a network that has no such attributes."""

    x0_range: tuple[float, float] | None = (-1.0, 1.0)  # where samplers may clip x0_hat (data in [-1, 1])

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        prediction: PredictionType = "eps",
        sample_shape: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if prediction == "eps" and float(diffusion.alpha_bar64[-1]) == 0:
            raise ConfigError(ZERO_SNR_NEEDS_V)
        self.net = net
        self.diffusion = diffusion
        self.prediction = prediction
        self.learn_sigma = bool(getattr(net, "learn_sigma", False))  # the net outputs 2C channels
        self._sample_shape = None if sample_shape is None else tuple(int(n) for n in sample_shape)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample x_t."""
        if self._sample_shape is not None:
            return self._sample_shape
        try:
            size = self.net.image_size
            height, width = (size, size) if isinstance(size, int) else size
            return (int(self.net.in_channels), int(height), int(width))
        except AttributeError:
            raise AttributeError(
                f"{type(self.net).__name__} has no in_channels / image_size: give Denoiser(..., sample_shape=(C, H, W))"
            ) from None

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional network (its null label is ``num_classes``), else None."""
        return getattr(self.net, "num_classes", None) or None

    @property
    def tokenizer(self):
        """The tokenizer of a text-conditioned network (captions -> (tokens, token_mask)), else None."""
        encoder = getattr(self.net, "text_encoder", None)
        return None if encoder is None else encoder.tokenizer

    @property
    def cond_channels(self) -> int:
        """The channels of the conditioning image concatenated with x_t (0: no image condition)."""
        return int(getattr(self.net, "cond_channels", 0) or 0)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | Tensor | None = None) -> Prediction:
        cond = Cond.of(cond)
        out = self.net(x_t, t) if cond is None else self.net(x_t, t, cond)
        return self.from_output(out.float(), x_t, t)

    def decode(self, x0: Tensor) -> Tensor:
        """A sample of the diffusion's space as an image: the identity here (a latent denoiser decodes)."""
        return x0

    def from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Prediction:
        var_interp = None
        if self.learn_sigma:
            out, r = out.chunk(2, dim=1)  # [B,2C,H,W] -> prediction [B,C,H,W], variance output [B,C,H,W]
            var_interp = (r + 1.0) / 2.0  # iDDPM eq. (15)'s v
        return self.prediction_of(out, x_t, t, var_interp)

    def prediction_of(self, out: Tensor, x_t: Tensor, t: Tensor, var_interp: Tensor | None = None) -> Prediction:
        """The Prediction of ``out`` [B,C,H,W], a value of what the network predicts (the inverse of output_of)."""
        d = self.diffusion
        if self.prediction == "eps":
            return Prediction(out, d.x0_from_eps(x_t, t, out), var_interp)
        if self.prediction == "x0":
            return Prediction(d.eps_from_x0(x_t, t, out), out, var_interp)
        return Prediction(d.eps_from_v(x_t, t, out), d.x0_from_v(x_t, t, out), var_interp)

    def output_of(self, pred: Prediction, x_t: Tensor, t: Tensor) -> Tensor:
        """The quantity the network predicts, read back from a Prediction (for losses in output space)."""
        if self.prediction == "eps":
            return pred.eps_hat
        if self.prediction == "x0":
            return pred.x0_hat
        return self.diffusion.v_from_x0_eps(pred.x0_hat, t, pred.eps_hat)

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The true value of what the network predicts, for the simplified loss (DDPM eq. 14)."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return self.diffusion.v_from_x0_eps(x0, t, eps)


class DenoiserWrapper(nn.Module):
    """Base of the denoisers that wrap another one (guidance): they forward what samplers and ``generate`` read
    (net, diffusion, prediction, sample_shape, num_classes, learn_sigma, x0_range, decode) to ``self.denoiser``."""

    denoiser: nn.Module

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    @property
    def diffusion(self) -> GaussianDiffusion:
        return self.denoiser.diffusion

    @property
    def prediction(self) -> str:
        return self.denoiser.prediction

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.denoiser.sample_shape

    @property
    def num_classes(self) -> int | None:
        return self.denoiser.num_classes

    @property
    def tokenizer(self):
        """The tokenizer of a text-conditioned network (captions -> (tokens, token_mask)), else None."""
        encoder = getattr(self.net, "text_encoder", None)
        return None if encoder is None else encoder.tokenizer

    @property
    def cond_channels(self) -> int:
        return getattr(self.denoiser, "cond_channels", 0)

    @property
    def learn_sigma(self) -> bool:
        return getattr(self.denoiser, "learn_sigma", False)

    @property
    def x0_range(self):
        return self.denoiser.x0_range

    def decode(self, x0: Tensor) -> Tensor:
        return self.denoiser.decode(x0)


def clip_x0(
    pred: Prediction, diffusion: GaussianDiffusion, x_t: Tensor, t: Tensor, lo: float = -1.0, hi: float = 1.0
) -> Prediction:
    """Clip x0_hat to the data range and re-derive eps_hat from the clipped x0_hat (so both stay consistent)."""
    x0_hat = pred.x0_hat.clamp(lo, hi)
    return pred._replace(eps_hat=diffusion.eps_from_x0(x_t, t, x0_hat), x0_hat=x0_hat)


def shift_score(pred: Prediction, diffusion: GaussianDiffusion, x_t: Tensor, t: Tensor) -> Prediction:
    """Apply the classifier's gradient to eps_hat: eps_hat - sqrt(1 - alpha_bar_t) * s grad log p(y | x_t)
    (Dhariwal & Nichol 2021, Algorithm 2), x0_hat re-derived from it; the gradient is then used up (None)."""
    if pred.guide_grad is None:
        return pred
    eps_hat = pred.eps_hat - extract(diffusion.sqrt_one_minus_alpha_bar, t, x_t.shape) * pred.guide_grad
    # At alpha_bar_t = 0 (zero terminal SNR) x_t says nothing of y, so the true gradient is 0: keep the prediction
    # (x0 from eps would divide by sqrt(alpha_bar_t) = 0 there).
    signal = extract(diffusion.alpha_bar, t, x_t.shape) > 0
    eps_hat = torch.where(signal, eps_hat, pred.eps_hat)
    x0_hat = torch.where(signal, diffusion.x0_from_eps(x_t, t, eps_hat), pred.x0_hat)
    return pred._replace(eps_hat=eps_hat, x0_hat=x0_hat, guide_grad=None)
