"""The Denoiser contract: one network output (eps, x0 or v) -> Prediction(eps_hat, x0_hat).

Every loss and every sampler talks to the network only through this.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import Tensor, nn

from ddpmlab.diffusion.gaussian import GaussianDiffusion

PredictionType = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")


class Prediction(NamedTuple):
    eps_hat: Tensor  # [B,C,H,W]
    x0_hat: Tensor  # [B,C,H,W]


class Denoiser(nn.Module):
    """Wraps ``net(x_t, t[, cond])`` whose output is ``prediction`` (eps: DDPM eq. 11; x0; v: Salimans & Ho 2022)."""

    x0_range: tuple[float, float] | None = (-1.0, 1.0)  # where samplers may clip x0_hat (data in [-1, 1])

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, prediction: PredictionType = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.net = net
        self.diffusion = diffusion
        self.prediction = prediction

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Prediction:
        out = self.net(x_t, t) if cond is None else self.net(x_t, t, cond)
        return self.from_output(out.float(), x_t, t)

    def decode(self, x0: Tensor) -> Tensor:
        """A sample of the diffusion's space as an image: the identity here (a latent denoiser decodes)."""
        return x0

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


def clip_x0(pred: Prediction, diffusion: GaussianDiffusion, x_t: Tensor, t: Tensor, lo: float = -1.0, hi: float = 1.0) -> Prediction:
    """Clip x0_hat to the data range and re-derive eps_hat from the clipped x0_hat (so both stay consistent)."""
    x0_hat = pred.x0_hat.clamp(lo, hi)
    return Prediction(diffusion.eps_from_x0(x_t, t, x0_hat), x0_hat)
