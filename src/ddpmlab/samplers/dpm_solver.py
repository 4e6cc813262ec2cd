"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast solver for guided sampling of diffusion probabilistic
models", Algorithm 2): a multistep second-order solver of the probability-flow ODE in data prediction x0_hat,
for 10-25 steps.

Notation of the paper (Sec. 2), for a discrete-time model: alpha_t = sqrt(alpha_bar_t), sigma_t =
sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR). The network is evaluated once at
each of the S grid entries; step i goes from grid entry i to grid entry i+1, and the last step from the last
grid entry to x_0 itself (sigma = 0, lambda = +inf). That last step has h = inf, where the second-order
correction is undefined (r = h_{i-1}/h_i = 0), so it is first order and returns x0_hat, as diffusers'
``final_sigmas_type="zero"`` does; the first step is first order too (Algorithm 2, line 4).

At zero terminal SNR (Lin et al. 2024) a grid that starts at T-1 starts at alpha = 0, lambda = -inf: the first
step has h = inf and its first-order update is the limit x_t = (sigma_t / sigma_s) x + alpha_t x0_hat (DDIM from
pure noise, sigma_s = 1); the second step's r = inf makes its correction 1 / (2r) vanish, the limit again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.samplers.base import SamplerStep, as_grid, final, grid_alpha_bar, predict


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma): +inf at x_0 (sigma = 0), -inf at zero terminal SNR (alpha = 0)."""
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma) if alpha > 0 else -math.inf


def dpm_solver_pp_2m_update(
    x: Tensor,
    x0_hat: Tensor,
    x0_hat_prev: Tensor | None,
    lam_prev: float,
    lam_s: float,
    lam_t: float,
    sigma_s: float,
    sigma_t: float,
    alpha_t: float,
) -> Tensor:
    """One step from time s (with x, and x0_hat there) to time t. ``x0_hat_prev`` is the data prediction at the
    grid point before s (lambda ``lam_prev``); None gives the first-order step (DPM-Solver++(1) = DDIM)."""
    h = lam_t - lam_s  # Algorithm 2, line 1: h_i = lambda_{t_i} - lambda_{t_{i-1}}
    if x0_hat_prev is None or math.isinf(h):
        D = x0_hat  # first order: Algorithm 2, line 4
    else:
        r = (lam_s - lam_prev) / h  # line 7: r_i = h_{i-1} / h_i
        D = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_hat_prev  # line 8
    # line 9: x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
    return (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * D


@torch.no_grad()
def dpm_solver_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,  # unused: the solver is deterministic given x_T
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield the solver's state after each of the S steps (one network evaluation each); the last is x_0."""
    ts = as_grid(timesteps, denoiser.diffusion.T)
    alpha_bar, _ = grid_alpha_bar(denoiser.diffusion, ts)
    # S+1 time points: the grid, then x_0 (alpha = 1, sigma = 0, lambda = +inf). float64 throughout.
    alpha = alpha_bar.sqrt().tolist() + [1.0]
    sigma = (1 - alpha_bar).sqrt().tolist() + [0.0]
    lam = [half_log_snr(a, s) for a, s in zip(alpha, sigma, strict=True)]
    x, x0_hat_prev = x_T, None  # x0_hat_prev: the buffer Q of Algorithm 2
    for i, t in enumerate(ts.tolist()):
        pred = predict(denoiser, x, t, cond, clip_x0)
        lam_prev = lam[i - 1] if i > 0 else math.nan
        x = dpm_solver_pp_2m_update(
            x, pred.x0_hat, x0_hat_prev, lam_prev, lam[i], lam[i + 1], sigma[i], sigma[i + 1], alpha[i + 1]
        )
        x0_hat_prev = pred.x0_hat
        yield SamplerStep(t, x, pred.x0_hat)


def dpm_solver_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`dpm_solver_sample_progressive` (same arguments)."""
    return final(dpm_solver_sample_progressive(*args, **kwargs))
