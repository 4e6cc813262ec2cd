"""Training objectives: callables ``(denoiser, x0, t, eps, cond=None) -> per-sample loss [B]``, on the denoiser's
own diffusion (``denoiser.diffusion``)."""

from __future__ import annotations

from torch import Tensor

from ddpmlab.diffusion.gaussian import extract
from ddpmlab.diffusion.parameterization import Denoiser, Prediction
from ddpmlab.errors import ConfigError


def mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def noised_prediction(
    denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None = None
) -> tuple[Tensor, Prediction]:
    """(x_t, the denoiser's Prediction at x_t): x_t = q_sample(x0, t, eps), DDPM eq. (4), on the denoiser's own
    diffusion, where every term of every loss is evaluated."""
    x_t = denoiser.diffusion.q_sample(x0, t, eps)
    return x_t, denoiser(x_t, t, cond)


def simple_term(denoiser: Denoiser, pred: Prediction, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """DDPM eq. (14)'s squared error per sample, [B], in what the network predicts (eps, x0 or v)."""
    return mean_flat((denoiser.output_of(pred, x_t, t) - denoiser.target(x0, t, eps)) ** 2)


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

    def __call__(self, denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None = None) -> Tensor:
        x_t, pred = noised_prediction(denoiser, x0, t, eps, cond)
        return simple_term(denoiser, pred, x0, x_t, t, eps)


class MinSNRLoss(SimpleLoss):
    """Min-SNR-gamma weighting (Hang et al. 2023): the eps-MSE weighted by min(snr_t, gamma) / snr_t,
    which equals an x0-MSE clipped at gamma. Defined here for eps prediction."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def __call__(self, denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None = None) -> Tensor:
        if denoiser.prediction != "eps":
            raise ValueError("MinSNRLoss is defined for prediction='eps'; use SimpleLoss for x0 or v")
        snr_t = extract(denoiser.diffusion.snr, t, (t.shape[0],))
        # min(snr, gamma) / snr written as min(1, gamma / snr): its limit 1 at snr = 0 (zero terminal SNR), not 0/0
        return super().__call__(denoiser, x0, t, eps, cond) * (self.gamma / snr_t).clamp(max=1.0)
