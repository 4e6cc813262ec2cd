"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on the full grid or a respaced one."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.gaussian import GaussianDiffusion, Variance
from ddpmlab.diffusion.parameterization import Denoiser, clip_x0 as _clip
from ddpmlab.samplers.base import SamplerStep, as_grid, batch_t, final, randn_like


@torch.no_grad()
def ddpm_sample_progressive(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    variance: Variance = "small",
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield x_{t-1} ~ p_theta(x_{t-1} | x_t) for every t of ``timesteps`` (descending).

    A grid shorter than T samples the respaced process (improved-diffusion): its betas are rebuilt from
    the kept alpha_bar, and the network still sees the original timestep.
    """
    ts = as_grid(timesteps, diffusion.T)
    S = ts.numel()
    process = diffusion if S == diffusion.T else diffusion.respace(ts)
    x = x_T
    for i, t in enumerate(ts.tolist()):
        j = batch_t(S - 1 - i, x)  # index into the (respaced) process; == t on the full grid
        pred = denoiser(x, batch_t(t, x), cond)
        if clip_x0:
            pred = _clip(pred, diffusion, x, batch_t(t, x))
        p = process.p_mean_variance(pred.x0_hat, x, j, variance)
        # Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z, with z = 0 at the last step.
        x = p.mean + (0.5 * p.log_variance).exp() * randn_like(x, generator) if i < S - 1 else p.mean
        yield SamplerStep(t, x, pred.x0_hat)


def ddpm_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`ddpm_sample_progressive` (same arguments)."""
    return final(ddpm_sample_progressive(*args, **kwargs))
