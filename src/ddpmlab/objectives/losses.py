"""Training objectives: callables ``(denoiser, diffusion, x0, t, eps, cond=None) -> per-sample loss [B]``.

``diffusion`` must be the denoiser's own (``denoiser.diffusion``); another schedule is refused."""

from __future__ import annotations

from torch import Tensor

from ddpmlab.diffusion.gaussian import GaussianDiffusion, extract
from ddpmlab.diffusion.parameterization import Denoiser, check_same_diffusion
from ddpmlab.errors import ConfigError


def mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


class SimpleLoss:
    """DDPM eq. (14): L_simple = E_{t, x0, eps} || target - net(x_t, t) ||^2, where the target is what the
    network predicts (eps for DDPM; x0 or v for the other parameterizations)."""

    def check(self, denoiser: Denoiser) -> None:
        """Refuse a network whose variance this loss would leave untrained."""
        if denoiser.learn_sigma:
            raise ConfigError(
                "model.learn_sigma=true needs an objective that trains the variance: objective=hybrid "
                "(L_simple + 0.001 L_vlb, iDDPM Sec. 3.1) or objective=vlb"
            )

    def __call__(
        self,
        denoiser: Denoiser,
        diffusion: GaussianDiffusion,
        x0: Tensor,
        t: Tensor,
        eps: Tensor,
        cond: Tensor | None = None,
    ) -> Tensor:
        check_same_diffusion(denoiser, diffusion)
        x_t = diffusion.q_sample(x0, t, eps)
        pred = denoiser(x_t, t, cond)
        return mean_flat((denoiser.output_of(pred, x_t, t) - denoiser.target(x0, t, eps)) ** 2)


class MinSNRLoss(SimpleLoss):
    """Min-SNR-gamma weighting (Hang et al. 2023): the eps-MSE weighted by min(snr_t, gamma) / snr_t,
    which equals an x0-MSE clipped at gamma. Defined here for eps prediction."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def __call__(
        self,
        denoiser: Denoiser,
        diffusion: GaussianDiffusion,
        x0: Tensor,
        t: Tensor,
        eps: Tensor,
        cond: Tensor | None = None,
    ) -> Tensor:
        if denoiser.prediction != "eps":
            raise ValueError("MinSNRLoss is defined for prediction='eps'; use SimpleLoss for x0 or v")
        snr_t = extract(diffusion.snr, t, (t.shape[0],))
        return super().__call__(denoiser, diffusion, x0, t, eps, cond) * snr_t.clamp(max=self.gamma) / snr_t
