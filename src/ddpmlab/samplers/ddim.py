"""DDIM (Song et al. 2020), eq. (12), with stochasticity eta and any timestep grid."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.gaussian import GaussianDiffusion, extract
from ddpmlab.diffusion.parameterization import Denoiser, clip_x0 as _clip
from ddpmlab.samplers.base import SamplerStep, as_grid, batch_t, final, randn_like


@torch.no_grad()
def ddim_sample_progressive(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield x_{t_prev} for every t of ``timesteps``; alpha_bar_prev comes from the respaced process,
    i.e. the next grid entry (1 after the last), never from arithmetic on t."""
    ts = as_grid(timesteps, diffusion.T)
    S = ts.numel()
    process = diffusion if S == diffusion.T else diffusion.respace(ts)
    x = x_T
    for i, t in enumerate(ts.tolist()):
        j = batch_t(S - 1 - i, x)
        pred = denoiser(x, batch_t(t, x), cond)
        if clip_x0:
            pred = _clip(pred, diffusion, x, batch_t(t, x))
        alpha_bar_t = extract(process.alpha_bar, j, x.shape)
        alpha_bar_prev = extract(process.alpha_bar_prev, j, x.shape)
        # DDIM eq. (16): sigma_t(eta) = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)
        sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
        # DDIM eq. (12): x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma eps
        x = alpha_bar_prev.sqrt() * pred.x0_hat + (1 - alpha_bar_prev - sigma_t**2).clamp(min=0).sqrt() * pred.eps_hat
        if eta > 0 and i < S - 1:
            x = x + sigma_t * randn_like(x, generator)
        yield SamplerStep(t, x, pred.x0_hat)


def ddim_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`ddim_sample_progressive` (same arguments)."""
    return final(ddim_sample_progressive(*args, **kwargs))
