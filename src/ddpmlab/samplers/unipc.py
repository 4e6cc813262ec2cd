"""UniPC (Zhao et al. 2023, "UniPC: A unified predictor-corrector framework for fast sampling of diffusion models"):
the multistep predictor UniP-p and the corrector UniC-p, in data prediction x0_hat, with B(h) = e^h - 1 (their
B_2, "bh2"), for 5-20 steps.

Notation of DPM-Solver (dpm_solver.py): alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t =
log(alpha_t / sigma_t); grid entry i is the step from t_i to t_{i+1}, and after the last entry x_0 (sigma = 0).
At grid entry i the network is evaluated once, at the predicted x_{t_i}; UniC uses that evaluation to correct
x_{t_i} (Theorem 3.1: UniC after an order-p step gives order p + 1), and UniP of order p steps on from the corrected
x_{t_i} with the same evaluation, so a sample costs S evaluations. The last step (to sigma = 0, h = inf) is first
order and returns x0_hat, and is not corrected (there is no evaluation after it). The order ramps up from 1 as the
history fills and, with diffusers' ``lower_order_final``, step i is at most of order S - i.

Each update is x_t = (sigma_t / sigma_s) x_s - alpha_t h_phi_1 m_0 - alpha_t B(h) sum_k a_k D_k, with h_phi_1 =
e^{-h} - 1, D_k = (m_k - m_0) / r_k the differences of the data predictions m_k at the points s_k (r_k = (lambda_{s_k}
- lambda_s) / h; r = 1 for the corrector's new point), and a solving the order conditions R a = g / B(h) over those
r_k (R_{ij} = r_j^(i-1), g_i = i! h_phi_{i+1}, with the phi functions of -h), as in the authors' code and diffusers'
UniPCMultistepScheduler(predict_x0=True, solver_type="bh2").
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.samplers.base import SamplerStep, as_grid, final, grid_alpha_bar, predict
from ddpmlab.samplers.dpm_solver import half_log_snr


def unipc_coefficients(rks: list[float], h: float) -> tuple[list[float], float]:
    """The solution a of R a = g / B(h) over the points ``rks`` (one order condition per point), and B(h)."""
    hh = -h  # data prediction integrates in -lambda
    B_h = math.expm1(hh)  # bh2: B(h) = e^h - 1
    h_phi_k, factorial, g = math.expm1(hh) / hh - 1, 1, []  # h phi_2(h); phi_{k+1} = (phi_k - 1/k!) / h
    for i in range(1, len(rks) + 1):
        g.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if len(rks) == 1:
        return [0.5], B_h  # the 1x1 system's solution is 1/2 + O(h); 1/2 keeps the order (the authors' choice)
    R = torch.tensor([[r ** (i - 1) for r in rks] for i in range(1, len(rks) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64)).tolist(), B_h


def unipc_update(
    x: Tensor,
    m: list[Tensor],
    lams: list[float],
    lam_t: float,
    sigma_s: float,
    sigma_t: float,
    alpha_t: float,
    m_t: Tensor | None = None,
) -> Tensor:
    """One UniP step from s (x there, data predictions ``m`` at s and the points before it, newest first, with their
    lambdas ``lams``) to t; with ``m_t`` (the data prediction at the predicted x_t) the UniC step instead, which
    corrects x_t using all of ``m`` and m_t. Order: len(m) (+1 for UniC)."""
    h = lam_t - lams[0]
    x_t = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * m[0]  # the first-order (DDIM) part
    # A point at lambda = -inf (x_T of a zero-terminal-SNR schedule) is infinitely far: its difference D_k = (m_k - m_0)
    # / r_k vanishes, and it leaves the order conditions with it (a step of one order lower, its limit).
    m = [m[0]] + [m_k for m_k, lam in zip(m[1:], lams[1:], strict=True) if math.isfinite(lam)]
    lams = [lams[0]] + [lam for lam in lams[1:] if math.isfinite(lam)]
    rks = [(lam - lams[0]) / h for lam in lams[1:]] + ([1.0] if m_t is not None else [])
    D = [(m_k - m[0]) / r_k for m_k, r_k in zip(m[1:], rks, strict=False)]
    if m_t is not None:
        D.append(m_t - m[0])  # r = 1
    if not D:
        return x_t
    a, B_h = unipc_coefficients(rks, h)
    return x_t - alpha_t * B_h * sum(a_k * D_k for a_k, D_k in zip(a, D, strict=True))


@torch.no_grad()
def unipc_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,  # unused: the solver is deterministic given x_T
    order: int = 2,
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield the predicted x at the next grid entry after each of the S evaluations (the corrector refines it with
    the next evaluation); the last is x_0. ``order``: the predictor's order p (2 or 3)."""
    assert order in (2, 3), order  # Sampler checks the configuration
    ts = as_grid(timesteps, denoiser.diffusion.T)
    alpha_bar, _ = grid_alpha_bar(denoiser.diffusion, ts)
    alpha = alpha_bar.sqrt().tolist() + [1.0]
    sigma = (1 - alpha_bar).sqrt().tolist() + [0.0]
    lam = [half_log_snr(a, s) for a, s in zip(alpha, sigma, strict=True)]  # -inf at zero terminal SNR
    S = ts.numel()
    x, m, x_prev, p_prev = x_T, [], None, 0  # m: data predictions, newest first; x_prev: corrected x at t_{i-1}
    for i, t in enumerate(ts.tolist()):
        m_t = predict(denoiser, x, t, cond, clip_x0).x0_hat
        if i > 0:  # UniC-p on the previous step (order p_prev), reusing this evaluation
            lams = lam[i - 1 :: -1][:p_prev]
            x = unipc_update(x_prev, m[:p_prev], lams, lam[i], sigma[i - 1], sigma[i], alpha[i], m_t=m_t)
        m = [m_t, *m[: order - 1]]
        p = min(order, S - i, i + 1)  # lower_order_final; warm-up
        x_prev, p_prev = x, p
        x = unipc_update(x, m[:p], lam[i::-1][:p], lam[i + 1], sigma[i], sigma[i + 1], alpha[i + 1])  # UniP-p
        yield SamplerStep(t, x, m_t)


def unipc_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`unipc_sample_progressive` (same arguments)."""
    return final(unipc_sample_progressive(*args, **kwargs))
