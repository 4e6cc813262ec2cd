"""The objectives of Improved DDPM (Nichol & Dhariwal 2021, Sec. 3.1 and 3.3) for a network that also learns its
variance (model.learn_sigma, iDDPM eq. 15): L_hybrid = L_simple + lambda L_vlb, and L_vlb alone.

L_vlb = L_0 + L_1 + ... + L_{T-1} (DDPM eq. 5; L_T has no parameters). With t drawn uniformly, T L_t is an unbiased
estimate of it, so each per-sample loss below carries T L_t in bits/dim (as ``vb_terms_bpd``); a non-uniform
timestep sampler (objectives.timestep_samplers) reweights it by 1 / (T p_t), which the training module applies.
"""

from __future__ import annotations

from torch import Tensor

from ddpmlab.diffusion.parameterization import Denoiser, Prediction
from ddpmlab.errors import ConfigError
from ddpmlab.objectives.likelihood import vb_term_of
from ddpmlab.objectives.losses import noised_prediction, simple_term
from ddpmlab.objectives.timestep_samplers import TimestepSampler, UniformSampler


def _needs_learned_sigma(denoiser: Denoiser, name: str) -> None:
    if not denoiser.learn_sigma:
        raise ConfigError(
            f"objective={name} trains the variance the network predicts: set model.learn_sigma=true "
            "(or use objective=simple for a fixed-variance model)"
        )


class HybridLoss:
    """iDDPM Sec. 3.1: L_hybrid = L_simple + lambda L_vlb, lambda = 0.001, with a stop-gradient on the mean inside
    L_vlb, so that L_simple alone drives the mean and L_vlb the variance."""

    name = "hybrid"

    def __init__(self, lambda_vlb: float = 0.001, timestep_sampler: TimestepSampler | None = None):
        if not lambda_vlb >= 0:
            raise ConfigError(f"objective.lambda_vlb={lambda_vlb} must be >= 0 (iDDPM: 0.001)")
        self.lambda_vlb = float(lambda_vlb)
        self.timestep_sampler = timestep_sampler or UniformSampler()

    def check(self, denoiser: Denoiser) -> None:
        _needs_learned_sigma(denoiser, self.name)

    def __call__(self, denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None = None) -> Tensor:
        x_t, pred = noised_prediction(denoiser, x0, t, eps, cond)
        simple = simple_term(denoiser, pred, x0, x_t, t, eps)  # DDPM eq. (14)
        frozen = Prediction(pred.eps_hat.detach(), pred.x0_hat.detach(), pred.var_interp)  # stop-grad on mu_theta
        diffusion = denoiser.diffusion
        vlb = diffusion.T * vb_term_of(frozen, diffusion, x0, x_t, t, variance="learned")  # T L_t ~ L_vlb
        return simple + self.lambda_vlb * vlb


class VLBLoss:
    """iDDPM Sec. 3.3: L_vlb alone, mean and variance both trained by it. Its gradient is noisy under uniform t;
    the paper draws t by importance (``timestep_sampler=ImportanceSampler``: objective=vlb's default)."""

    name = "vlb"

    def __init__(self, timestep_sampler: TimestepSampler | None = None):
        self.timestep_sampler = timestep_sampler or UniformSampler()

    def check(self, denoiser: Denoiser) -> None:
        _needs_learned_sigma(denoiser, self.name)

    def __call__(self, denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None = None) -> Tensor:
        x_t, pred = noised_prediction(denoiser, x0, t, eps, cond)
        diffusion = denoiser.diffusion
        return diffusion.T * vb_term_of(pred, diffusion, x0, x_t, t, variance="learned")  # T L_t ~ L_vlb
