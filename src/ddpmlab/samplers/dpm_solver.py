"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast solver for guided sampling of diffusion probabilistic
models", Algorithm 2): a multistep second-order solver of the probability-flow ODE in data prediction x0_hat,
for 10-25 steps; and its third-order sibling DPM-Solver++(3M) (``order=3``).

Notation of the paper (Sec. 2), for a discrete-time model: alpha_t = sqrt(alpha_bar_t), sigma_t =
sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR). The network is evaluated once at
each of the S grid entries; step i goes from grid entry i to grid entry i+1, and the last step from the last
grid entry to x_0 itself (sigma = 0, lambda = +inf). That last step has h = inf, where the second-order
correction is undefined (r = h_{i-1}/h_i = 0), so it is first order and returns x0_hat, as diffusers'
``final_sigmas_type="zero"`` does; the first step is first order too (Algorithm 2, line 4).

3M starts with a first- and a second-order step (its history is short) and, as the authors' code and diffusers'
``lower_order_final``, falls back to second order on the step before the last when S < 15 (a stability heuristic for
few steps). Its update is the exponential integrator of DPM-Solver++ eq. (9) with the Taylor expansion of x0_hat in
lambda to second order, the derivatives taken by divided differences over the last three grid points. The
authors' code and diffusers (``multistep_dpm_solver_third_order_update``) weight the second-derivative term D2 =
h^2 x0_hat''/2 by half of its exact coefficient, which leaves a local error O(h^3) (a second-order method); here
the coefficient is the exact one, and the solver is third order (tests/test_diffusers_crosscheck.py measures the
difference, tests/test_samplers_dpm_solver.py the orders).

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


def dpm_solver_pp_3m_update(
    x: Tensor,
    x0_hats: tuple[Tensor, Tensor, Tensor],
    lams: tuple[float, float, float],
    lam_t: float,
    sigma_s: float,
    sigma_t: float,
    alpha_t: float,
) -> Tensor:
    """One third-order step from time s to t: ``x0_hats`` are the data predictions at s and the two grid points
    before it (newest first, m0, m1, m2), ``lams`` their lambdas. The exponential integrator (DPM-Solver++ eq. 9)
    sigma_t / sigma_s x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0_hat(lambda) dlambda with x0_hat expanded
    as m0 + x0_hat' (lambda - lambda_s) + x0_hat'' (lambda - lambda_s)^2 / 2, integrated exactly."""
    m0, m1, m2 = x0_hats
    h, h_0, h_1 = lam_t - lams[0], lams[0] - lams[1], lams[1] - lams[2]
    r0, r1 = h_0 / h, h_1 / h
    D1_0, D1_1 = (m0 - m1) / r0, (m1 - m2) / r1  # divided differences, scaled by h
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)  # = h x0_hat' + O(h^3)
    D2 = (D1_0 - D1_1) / (r0 + r1)  # = h^2 x0_hat'' / 2 + O(h^3)
    phi_1 = -math.expm1(-h)  # int_0^h e^{u-h} du = 1 - e^{-h}
    phi_2 = (h - phi_1) / h  # int_0^h e^{u-h} u du / h
    phi_3 = (h * h - 2 * h + 2 * phi_1) / (h * h)  # int_0^h e^{u-h} u^2 du / h^2
    return (sigma_t / sigma_s) * x + alpha_t * (phi_1 * m0 + phi_2 * D1 + phi_3 * D2)


def solver_order(order: int, i: int, S: int) -> int:
    """The order of step i of S: warm-up (i + 1 points known), first order on the last step (to sigma = 0), at most
    second order on the step before it when S < 15 (diffusers' ``lower_order_final``)."""
    if i == S - 1:
        return 1
    return min(order, i + 1, 2 if i == S - 2 and S < 15 else order)


@torch.no_grad()
def dpm_solver_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,  # unused: the solver is deterministic given x_T
    order: int = 2,
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield the solver's state after each of the S steps (one network evaluation each); the last is x_0.
    ``order``: 2 (DPM-Solver++(2M)) or 3 (3M)."""
    assert order in (2, 3), order  # Sampler checks the configuration
    ts = as_grid(timesteps, denoiser.diffusion.T)
    alpha_bar, _ = grid_alpha_bar(denoiser.diffusion, ts)
    # S+1 time points: the grid, then x_0 (alpha = 1, sigma = 0, lambda = +inf). float64 throughout.
    alpha = alpha_bar.sqrt().tolist() + [1.0]
    sigma = (1 - alpha_bar).sqrt().tolist() + [0.0]
    lam = [half_log_snr(a, s) for a, s in zip(alpha, sigma, strict=True)]
    S = ts.numel()
    x, x0_hats = x_T, []  # x0_hats: the data predictions so far, newest first (the buffer Q of Algorithm 2)
    for i, t in enumerate(ts.tolist()):
        pred = predict(denoiser, x, t, cond, clip_x0)
        x0_hats = [pred.x0_hat, *x0_hats[:2]]
        k = solver_order(order, i, S)
        if k == 3:
            x = dpm_solver_pp_3m_update(
                x, tuple(x0_hats), (lam[i], lam[i - 1], lam[i - 2]), lam[i + 1], sigma[i], sigma[i + 1], alpha[i + 1]
            )
        else:
            x0_hat_prev = x0_hats[1] if k == 2 else None
            lam_prev = lam[i - 1] if k == 2 else math.nan
            x = dpm_solver_pp_2m_update(
                x, pred.x0_hat, x0_hat_prev, lam_prev, lam[i], lam[i + 1], sigma[i], sigma[i + 1], alpha[i + 1]
            )
        yield SamplerStep(t, x, pred.x0_hat)


def dpm_solver_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`dpm_solver_sample_progressive` (same arguments)."""
    return final(dpm_solver_sample_progressive(*args, **kwargs))
