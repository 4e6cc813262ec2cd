"""The variational bound on the negative log-likelihood, DDPM eq. (5), term by term, in bits per dimension.

    L = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                      (the prior term; no parameters)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))  (Gaussian vs Gaussian, DDPM eqs. 6-7)
    L_0     = -log p_theta(x_0 | x_1)                          (the discretised Gaussian decoder, DDPM eq. 13)

In code indices (t = 0..T-1 is the paper's step t+1): index t >= 1 gives the paper's L_t-term
KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) and index 0 gives the decoder L_0. Data x_0 lie on the 256 levels
{-1, -1 + 2/255, ..., 1} of [-1, 1], so the decoder's bins have width 2/255 (half-width 1/255), as in DDPM and
improved-diffusion; every term is a mean over dimensions divided by ln 2, so the sum is bits/dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpmlab.diffusion.gaussian import GaussianDiffusion
from ddpmlab.diffusion.parameterization import Denoiser, Prediction
from ddpmlab.diffusion.parameterization import clip_x0 as _clip
from ddpmlab.objectives.losses import mean_flat, noised_prediction

LN2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (broadcasts)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def log_normal_interval(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b (either may be infinite), without cancellation in either tail: an interval
    in the upper tail is reflected into the lower one, and
    log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - e^{log Phi(a) - log Phi(b)})."""
    upper = (a + b) > 0
    a, b = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def discretized_gaussian_log_likelihood(
    x0: Tensor, mean: Tensor, log_scale: Tensor, half_bin: float = 1.0 / 255.0
) -> Tensor:
    """DDPM eq. (13): log of the mass N(mean, e^{2 log_scale}) puts on x0's bin [x0 - 1/255, x0 + 1/255], the edge
    bins stretched to -inf (x0 = -1) and +inf (x0 = 1), so the 256 bins' masses sum to 1. Per element, nats, float64."""
    x0, mean, inv_scale = x0.double(), mean.double(), torch.exp(-log_scale.double())
    lo = torch.where(x0 < -1 + half_bin, -math.inf, (x0 - half_bin - mean) * inv_scale)
    hi = torch.where(x0 > 1 - half_bin, math.inf, (x0 + half_bin - mean) * inv_scale)
    return log_normal_interval(lo, hi)


def prior_bpd(diffusion: GaussianDiffusion, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]: q(x_T | x_0) = N(sqrt(alpha_bar_T) x0, 1 - alpha_bar_T),
    DDPM eq. (4)."""
    t = torch.full((x0.shape[0],), diffusion.T - 1, device=x0.device, dtype=torch.long)
    mean, var = diffusion.q_mean_variance(x0, t)
    zero = torch.zeros((), device=x0.device)
    return mean_flat(normal_kl(mean, var.log(), zero, zero)) / LN2


def vb_terms_bpd(
    denoiser: Denoiser,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    variance: str = "auto",
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Tensor:
    """One term of the bound per sample, bits/dim [B]: at x_t = q_sample(x0, t, eps), the KL L_t for index t >= 1
    and the decoder's -log p(x_0 | x_1) for index t = 0. p_theta has mean mu_tilde(x_t, x0_hat) and variance
    beta ("large") or beta_tilde ("small"), DDPM Sec. 3.2, or the network's own ("learned", iDDPM eq. 15; "auto":
    learned where the network predicts a variance, else large); ``clip_x0`` clips x0_hat to [-1, 1] first. On the
    denoiser's own diffusion."""
    diffusion = denoiser.diffusion
    x_t, pred = noised_prediction(denoiser, x0, t, eps, cond)
    if clip_x0:
        pred = _clip(pred, diffusion, x_t, t)
    return vb_term_of(pred, diffusion, x0, x_t, t, variance=variance)


def vb_term_of(
    pred: Prediction, diffusion: GaussianDiffusion, x0: Tensor, x_t: Tensor, t: Tensor, *, variance: str = "auto"
) -> Tensor:
    """The bound's term at (x_t, t) for a given Prediction, bits/dim [B] (see :func:`vb_terms_bpd`)."""
    if variance == "auto":
        variance = "learned" if pred.var_interp is not None else "large"
    p = diffusion.p_mean_variance(pred.x0_hat, x_t, t, variance, var_interp=pred.var_interp)
    q = diffusion.q_posterior(x0, x_t, t)
    kl = mean_flat(normal_kl(q.mean, q.log_variance, p.mean, p.log_variance)) / LN2  # DDPM eq. (5), L_{t-1}
    if not (t == 0).any():
        return kl
    # Computed in float64; returned in the dtype of the KL terms (float32, or float64 on a float64 diffusion).
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)).to(kl.dtype) / LN2
    return torch.where(t == 0, decoder_nll, kl)
