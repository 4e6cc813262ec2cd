"""The Gaussian diffusion process of DDPM (Ho et al. 2020): tables, forward process, posterior, reverse step.

Holds no network. Every table is computed once in float64 and kept as a float32 buffer (not persistent:
checkpoints carry the config that rebuilds it, so a buffer can never silently disagree with the config).

The last beta may be exactly 1: a zero-terminal-SNR schedule (Lin et al. 2024), alpha_bar_T = 0, snr_T = 0. Every
table stays finite there but 1 / sqrt(alpha_bar) (``sqrt_recip_alpha_bar``, ``sqrt_recipm1_alpha_bar``: inf), so
x0 cannot be read from eps at T (``x0_from_eps`` is nan there; the Denoiser refuses eps prediction on such a
schedule), while every other conversion is well defined.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ddpmlab.diffusion.schedules import validate_betas

Variance = Literal["small", "large", "learned"]
# What a sampler or the likelihood may be told: a Variance, or "auto" (the network's own where it predicts one).
VARIANCES = ("auto", "small", "large", "learned")


def extract(table: Tensor, t: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Gather ``table[t]`` for a batch of indices ``t`` [B] and broadcast it to ``shape`` ([B,1,1,1])."""
    out = table.gather(0, t.to(device=table.device, dtype=torch.long))
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


class Posterior(NamedTuple):
    mean: Tensor  # mu_tilde_t(x_t, x0)      [B,C,H,W]
    variance: Tensor  # beta_tilde_t        [B,1,1,1]
    log_variance: Tensor  # log beta_tilde_t (clipped at t=0)


class GaussianDiffusion(nn.Module):
    """q(x_t | x_0), q(x_{t-1} | x_t, x_0) and p(x_{t-1} | x_t) given a predicted x0."""

    def __init__(self, betas: Tensor | list[float]):
        super().__init__()
        beta = validate_betas(torch.as_tensor(betas, dtype=torch.float64).flatten(), zero_terminal_snr=True)
        T = beta.numel()
        alpha = 1.0 - beta
        alpha_bar = torch.cumprod(alpha, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # DDPM eq. (7): variance of the posterior q(x_{t-1} | x_t, x_0); zero at t=0 (paper's t=1).
        beta_tilde = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # log(beta_tilde[0]) = -inf, so as improved-diffusion we clip it to beta_tilde[1].
        beta_tilde_1 = beta_tilde[1] if T > 1 else beta[0]
        log_beta_tilde = torch.log(torch.cat([beta_tilde_1.view(1), beta_tilde[1:]]))
        # Fixed-large variance sigma_t^2 = beta_t (DDPM Sec. 3.2), first entry as improved-diffusion.
        log_beta_large = torch.log(torch.cat([beta_tilde_1.view(1), beta[1:]]))

        tables = {
            "beta": beta,
            "alpha": alpha,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": alpha_bar.rsqrt(),
            "sqrt_recipm1_alpha_bar": (1.0 / alpha_bar - 1.0).sqrt(),
            "snr": alpha_bar / (1.0 - alpha_bar),
            "beta_tilde": beta_tilde,
            "log_beta_tilde": log_beta_tilde,
            "log_beta_large": log_beta_large,
            "log_beta": torch.log(beta),  # the upper bound of a learned variance, iDDPM eq. (15)
            # DDPM eq. (7): mu_tilde = coef_x0 * x0 + coef_xt * x_t
            "mu_tilde_coef_x0": beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "mu_tilde_coef_xt": (1.0 - alpha_bar_prev) * alpha.sqrt() / (1.0 - alpha_bar),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)
        self.T = T  # the number of diffusion steps (config: schedule.num_timesteps)
        # Exact float64 copies (plain attributes: they stay on the CPU) for grids and respacing, which need the
        # schedule without float32 rounding.
        self.beta64 = beta
        self._alpha_bar64 = alpha_bar

    @property
    def alpha_bar64(self) -> Tensor:
        """alpha_bar [T] in float64 on the CPU, computed once (DDPM eq. 4's alpha_bar_t = prod_{s<=t} (1 - beta_s))."""
        return self._alpha_bar64

    def extra_repr(self) -> str:
        return f"T={self.T}, beta=[{self.beta[0].item():.3g} .. {self.beta[-1].item():.3g}]"

    # ---------------------------------------------------------------- forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM eq. (4): q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)."""
        mean = extract(self.sqrt_alpha_bar, t, x0.shape) * x0
        return mean, extract(1.0 - self.alpha_bar, t, x0.shape)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """DDPM eq. (4), reparameterised: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        return (
            extract(self.sqrt_alpha_bar, t, x0.shape) * x0 + extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * eps
        )

    def q_step(self, x_prev: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """DDPM eq. (2), one forward step q(x_t | x_{t-1}): x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps."""
        return extract(self.alpha.sqrt(), t, x_prev.shape) * x_prev + extract(self.beta.sqrt(), t, x_prev.shape) * eps

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Posterior:
        """DDPM eqs. (6)-(7): q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I)."""
        mean = extract(self.mu_tilde_coef_x0, t, x_t.shape) * x0 + extract(self.mu_tilde_coef_xt, t, x_t.shape) * x_t
        return Posterior(mean, extract(self.beta_tilde, t, x_t.shape), extract(self.log_beta_tilde, t, x_t.shape))

    # ---------------------------------------------------------------- parameterizations
    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert eq. (4): x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (undefined at alpha_bar_t = 0)."""
        return (
            extract(self.sqrt_recip_alpha_bar, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alpha_bar, t, x_t.shape) * eps
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Invert eq. (4) for eps: eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t); no division by
        alpha_bar_t, so it holds at alpha_bar_T = 0 too (eps = x_T)."""
        return (x_t - extract(self.sqrt_alpha_bar, t, x_t.shape) * x0) / extract(
            self.sqrt_one_minus_alpha_bar, t, x_t.shape
        )

    def v_from_x0_eps(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Salimans & Ho 2022, Sec. 4: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""
        return (
            extract(self.sqrt_alpha_bar, t, x0.shape) * eps - extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * x0
        )

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        return (
            extract(self.sqrt_alpha_bar, t, x_t.shape) * x_t - extract(self.sqrt_one_minus_alpha_bar, t, x_t.shape) * v
        )

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
        return (
            extract(self.sqrt_one_minus_alpha_bar, t, x_t.shape) * x_t + extract(self.sqrt_alpha_bar, t, x_t.shape) * v
        )

    # ---------------------------------------------------------------- reverse process
    def p_mean_variance(
        self, x0_hat: Tensor, x_t: Tensor, t: Tensor, variance: Variance = "small", var_interp: Tensor | None = None
    ) -> Posterior:
        """p_theta(x_{t-1} | x_t) = N(mu_tilde_t(x_t, x0_hat), sigma_t^2 I).

        The mean is the posterior mean at the predicted x0, which equals DDPM eq. (11) for an eps
        prediction. sigma_t^2 is beta_tilde_t ("small") or beta_t ("large"), DDPM Sec. 3.2, or ("learned")
        the network's interpolation ``var_interp`` = v in [0, 1] between the two, iDDPM eq. (15), per element.
        The bounds are this process's own, so a respaced process interpolates between its own beta and beta_tilde.
        For "small" the returned variance is beta_tilde_t itself (0 at index 0) while the log-variance is clipped
        to log beta_tilde_1 there, as improved-diffusion's ``posterior_variance`` / ``posterior_log_variance_clipped``.
        """
        mean = self.q_posterior(x0_hat, x_t, t).mean
        if variance == "small":
            log_var = extract(self.log_beta_tilde, t, x_t.shape)
            # The variance itself is not clipped: beta_tilde at index 0 is 0, so nothing (a classifier's mean shift
            # Sigma * grad, Dhariwal & Nichol 2021 Alg. 1) moves the last step; only its log needs a finite value.
            return Posterior(mean, extract(self.beta_tilde, t, x_t.shape), log_var)
        elif variance == "large":
            log_var = extract(self.log_beta_large, t, x_t.shape)
        elif variance == "learned":
            if var_interp is None:
                raise ValueError(
                    "variance='learned' needs var_interp: the network must predict a variance (learn_sigma)"
                )
            log_min, log_max = extract(self.log_beta_tilde, t, x_t.shape), extract(self.log_beta, t, x_t.shape)
            log_var = var_interp * log_max + (1.0 - var_interp) * log_min  # iDDPM eq. (15)
        else:
            raise ValueError(f"variance must be 'small', 'large' or 'learned', got {variance!r}")
        return Posterior(mean, log_var.exp(), log_var)

    def respace(self, timesteps: Tensor | list[int]) -> "GaussianDiffusion":
        """A diffusion over the kept steps only (improved-diffusion, Sec. 4): keep alpha_bar at ``timesteps``
        and recompute beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}. Index i of the result is ``timesteps[i]``."""
        kept = torch.as_tensor(timesteps, dtype=torch.long).sort().values
        alpha_bar = self.alpha_bar64[kept]
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return GaussianDiffusion(1.0 - alpha_bar / alpha_bar_prev).to(self.beta.device)
