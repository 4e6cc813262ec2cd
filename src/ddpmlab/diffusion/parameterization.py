"""The Denoiser contract: one network output (eps, x0 or v) -> Prediction(eps_hat, x0_hat).

Every loss and every sampler talks to the network only through this.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ddpmlab.diffusion.gaussian import GaussianDiffusion

PredictionType = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")


class Prediction(NamedTuple):
    eps_hat: Tensor  # [B,C,H,W]
    x0_hat: Tensor  # [B,C,H,W]


class Denoiser(nn.Module):
    """Wraps ``net(x_t, t[, cond])`` whose output is ``prediction`` (eps: DDPM eq. 11; x0; v: Salimans & Ho 2022).

    It also says what it samples: ``sample_shape`` (C, H, W) of one x_t, and ``num_classes`` (None for an
    unconditional model; a conditional one takes labels 0..num_classes-1 as ``cond``). Both default to the
    network's ``in_channels`` / ``image_size`` / ``num_classes``; pass ``sample_shape`` for a network that has no
    such attributes (e.g. one denoising latents)."""

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
        self.net = net
        self.diffusion = diffusion
        self.prediction = prediction
        self._sample_shape = None if sample_shape is None else tuple(int(n) for n in sample_shape)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample x_t."""
        if self._sample_shape is not None:
            return self._sample_shape
        try:
            return (int(self.net.in_channels), int(self.net.image_size), int(self.net.image_size))
        except AttributeError:
            raise AttributeError(
                f"{type(self.net).__name__} has no in_channels / image_size: give Denoiser(..., sample_shape=(C, H, W))"
            ) from None

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional network (its null label is ``num_classes``), else None."""
        return getattr(self.net, "num_classes", None) or None

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Prediction:
        out = self.net(x_t, t) if cond is None else self.net(x_t, t, cond)
        return self.from_output(out.float(), x_t, t)

    def from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Prediction:
        d = self.diffusion
        if self.prediction == "eps":
            return Prediction(out, d.x0_from_eps(x_t, t, out))
        if self.prediction == "x0":
            return Prediction(d.eps_from_x0(x_t, t, out), out)
        return Prediction(d.eps_from_v(x_t, t, out), d.x0_from_v(x_t, t, out))

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


def check_same_diffusion(denoiser: nn.Module, diffusion: GaussianDiffusion) -> None:
    """Refuse a (denoiser, diffusion) pair whose schedules differ: the network was trained on its own
    diffusion's timesteps, so any other schedule would feed it the wrong noise levels."""
    own = getattr(denoiser, "diffusion", None)
    if own is None or own is diffusion:
        return
    if own.T != diffusion.T or not torch.equal(own.beta64, diffusion.beta64):
        raise ValueError(
            f"the diffusion given (T={diffusion.T}) is not the denoiser's own (T={own.T}); pass denoiser.diffusion"
        )


def clip_x0(pred: Prediction, diffusion: GaussianDiffusion, x_t: Tensor, t: Tensor, lo: float = -1.0, hi: float = 1.0) -> Prediction:
    """Clip x0_hat to the data range and re-derive eps_hat from the clipped x0_hat (so both stay consistent)."""
    x0_hat = pred.x0_hat.clamp(lo, hi)
    return Prediction(diffusion.eps_from_x0(x_t, t, x0_hat), x0_hat)
