"""EDM's samplers (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models"):
Algorithm 1 (Heun's 2nd-order method; Euler is the same without the correction) and Algorithm 2 (stochastic: noise
"churn" S_churn within [S_tmin, S_tmax], scaled by S_noise), applied to our VP model.

EDM's ODE is in the VE variable x~ = x / sqrt(alpha_bar) with noise level sigma = sqrt((1 - alpha_bar) / alpha_bar)
(EDM Sec. 2 and Table 1: s(t) = sqrt(alpha_bar), and x~ = x0 + sigma eps). Its denoiser D(x~; sigma) is the network's
x0_hat at the VP input sqrt(alpha_bar) x~ = x~ / sqrt(1 + sigma^2) and the integer t with that sigma, and
dx~/dsigma = (x~ - D(x~; sigma)) / sigma (eq. 3 with sigma(t) = t). The S grid entries t_0 > ... > t_{S-1} are the
steps t_i of the algorithms (any spacing; ``karras`` is EDM's eq. 5); t_S is sigma = 0, reached by an Euler step as
in EDM (Algorithm 1, line 6: no correction where t_{i+1} = 0), returning D there. Evaluations: S for Euler, 2S - 1
for Heun (one correction after each of the first S - 1 steps).

Churn: sigma_hat = (1 + gamma) sigma_i lies between the integer steps, where the network has never been evaluated.
We move sigma_hat to the code index with the nearest log sigma (at most T-1) and use that index's exact sigma, both
to add the noise (Algorithm 2, line 6) and for D: x_hat then really is at the noise level the network sees. (diffusers'
EulerDiscreteScheduler does not follow Algorithm 2 here: it evaluates the network at x_i and sigma_i before adding the
churn noise and reuses that eps at sigma_hat; its HeunDiscreteScheduler has no churn. k-diffusion's quantized
denoiser picks the same nearest index but keeps the unrounded sigma_hat in the step.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.samplers.base import SamplerStep, as_grid, final, predict, randn_like


def _churn(log_sigma: Tensor, t: int, N: int, S_churn: float, S_tmin: float, S_tmax: float | None) -> tuple[int, float]:
    """Algorithm 2, lines 4-5, on the integer steps: the code index t_hat and its sigma_hat >= sigma_t."""
    sigma = log_sigma[t].exp().item()
    in_range = S_tmin <= sigma and (S_tmax is None or sigma <= S_tmax)
    gamma = min(S_churn / N, math.sqrt(2) - 1) if in_range else 0.0  # line 4
    if gamma == 0:
        return t, sigma
    target = math.log(sigma * (1 + gamma))  # line 5: t_hat = t + gamma t, then the nearest integer step
    t_hat = int(torch.argmin((log_sigma[t:] - target).abs())) + t
    return t_hat, log_sigma[t_hat].exp().item()


@torch.no_grad()
def edm_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    heun: bool,
    generator: torch.Generator | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float | None = None,
    S_noise: float = 1.0,
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield x after each network evaluation, in the VP scale of the next grid entry (x_0 after the last step): S
    times for Euler; for Heun, after each Euler step and after its correction (2S - 1 times). ``t`` is the step the
    network saw (t_hat with churn, t_{i+1} for a correction), ``x0_hat`` D there."""
    assert S_churn >= 0 and S_noise > 0 and (S_tmax is None or S_tmin <= S_tmax)  # Sampler checks the configuration
    diffusion = denoiser.diffusion
    ts = as_grid(timesteps, diffusion.T).tolist()
    log_sigma = 0.5 * torch.log((1 - diffusion.alpha_bar64) / diffusion.alpha_bar64)  # [T] float64, ascending in t
    sigmas = [log_sigma[t].exp().item() for t in ts] + [0.0]  # t_0 .. t_{N-1}, t_N = 0
    N = len(ts)

    def D(x: Tensor, t: int, sigma: float) -> Tensor:  # EDM's denoiser from the VP network at the integer step t
        return predict(denoiser, x / math.sqrt(1 + sigma**2), t, cond, clip_x0).x0_hat

    x = x_T * math.sqrt(1 + sigmas[0] ** 2)  # x~_0 = x_T / sqrt(alpha_bar): variance 1 + sigma_max^2 ~ t_0^2 (line 1)
    for i, t in enumerate(ts):
        t_hat, sigma_hat = _churn(log_sigma, t, N, S_churn, S_tmin, S_tmax) if S_churn > 0 else (t, sigmas[i])
        if t_hat != t:  # line 6: x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps, eps ~ N(0, S_noise^2 I) (line 3)
            x = x + math.sqrt(sigma_hat**2 - sigmas[i] ** 2) * S_noise * randn_like(x, generator)
        x0_hat = D(x, t_hat, sigma_hat)
        d = (x - x0_hat) / sigma_hat  # line 7 (Algorithm 1, line 4)
        x_next = x + (sigmas[i + 1] - sigma_hat) * d  # line 8: the Euler step
        if heun and sigmas[i + 1] != 0:  # line 9: the correction, except on the last step to sigma = 0
            yield SamplerStep(t_hat, x_next / math.sqrt(1 + sigmas[i + 1] ** 2), x0_hat)
            x0_hat, t_hat = D(x_next, ts[i + 1], sigmas[i + 1]), ts[i + 1]
            d_prime = (x_next - x0_hat) / sigmas[i + 1]  # line 10
            x_next = x + (sigmas[i + 1] - sigma_hat) * (0.5 * d + 0.5 * d_prime)  # line 11
        x = x_next
        yield SamplerStep(t_hat, x / math.sqrt(1 + sigmas[i + 1] ** 2), x0_hat)


def euler_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float | None = None,
    S_noise: float = 1.0,
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """EDM's Euler sampler: Algorithm 2 without the correction (lines 9-11); S_churn = 0 is Euler's method on the
    ODE (which is DDIM). One network evaluation per grid entry. With churn its first-order error in the step down from
    sigma_hat does not shrink with the grid unless gamma does (the samples come out too smooth): EDM pairs churn with
    Heun."""
    options = dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, clip_x0=clip_x0, cond=cond)
    return edm_sample_progressive(denoiser, x_T, timesteps, heun=False, generator=generator, **options)


def heun_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float | None = None,
    S_noise: float = 1.0,
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """EDM's Heun sampler: Algorithm 1 (S_churn = 0) or 2. 2S - 1 network evaluations for S grid entries."""
    options = dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, clip_x0=clip_x0, cond=cond)
    return edm_sample_progressive(denoiser, x_T, timesteps, heun=True, generator=generator, **options)


def euler_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`euler_sample_progressive` (same arguments)."""
    return final(euler_sample_progressive(*args, **kwargs))


def heun_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`heun_sample_progressive` (same arguments)."""
    return final(heun_sample_progressive(*args, **kwargs))
