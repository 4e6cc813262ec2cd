"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on the full grid or a respaced one."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.gaussian import VARIANCES, GaussianDiffusion
from ddpmlab.diffusion.parameterization import Denoiser, Prediction
from ddpmlab.samplers.base import SamplerStep, as_grid, batch_t, final, predict, randn_like


def ddpm_step(
    pred: Prediction, process: GaussianDiffusion, x_t: Tensor, j: Tensor, noise: Tensor | None, variance: str = "auto"
) -> Tensor:
    """One draw x_{t-1} ~ p_theta(x_{t-1} | x_t) of ``process`` at its index ``j`` [B]; ``noise=None`` returns the mean.

    The mean is mu_tilde(x_t, x0_hat), DDPM eq. (7), which equals eq. (11) for an eps prediction;
    sigma_t^2 is beta_tilde_t ("small") or beta_t ("large"), DDPM Sec. 3.2, or the network's own ("learned", iDDPM
    eq. 15, between ``process``'s bounds); "auto" is "learned" where the prediction carries a variance, else "small".
    A classifier-guided prediction shifts the mean by Sigma * s grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 1)."""
    if variance == "auto":
        variance = "learned" if pred.var_interp is not None else "small"
    p = process.p_mean_variance(pred.x0_hat, x_t, j, variance, var_interp=pred.var_interp)
    mean = p.mean if pred.guide_grad is None else p.mean + p.variance * pred.guide_grad  # Algorithm 1, line 4
    if noise is None:
        return mean
    return mean + (0.5 * p.log_variance).exp() * noise  # DDPM Algorithm 2, line 4


@torch.no_grad()
def ddpm_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    variance: str = "auto",
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield x_{t-1} ~ p_theta(x_{t-1} | x_t) for every t of ``timesteps`` (descending); z = 0 at the last step.

    Any grid, the full one included, samples the respaced process (improved-diffusion, Sec. 4): its betas are
    rebuilt from the kept alpha_bar, 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}, which on the full grid are the
    original betas again. The network still sees the original timestep (of ``denoiser.diffusion``); a learned
    variance interpolates between the respaced process's beta and beta_tilde (both recomputed there, as
    improved-diffusion does).
    """
    assert variance in VARIANCES, variance  # Sampler checks the configuration
    ts = as_grid(timesteps, denoiser.diffusion.T)
    process = denoiser.diffusion.respace(ts)  # its index j is the j-th smallest grid entry: step i is j = S-1-i
    S = ts.numel()
    x = x_T
    for i, t in enumerate(ts.tolist()):
        pred = predict(denoiser, x, t, cond, clip_x0, keep_guide_grad=True)
        noise = randn_like(x, generator) if i < S - 1 else None
        x = ddpm_step(pred, process, x, batch_t(S - 1 - i, x), noise, variance)
        yield SamplerStep(t, x, pred.x0_hat)


def ddpm_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`ddpm_sample_progressive` (same arguments)."""
    return final(ddpm_sample_progressive(*args, **kwargs))
