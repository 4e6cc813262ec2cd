"""Beta schedules: pure functions returning float64 betas of shape [T], each validated."""

from __future__ import annotations

import math

import torch

from ddpmlab.errors import ConfigError


def validate_betas(betas: torch.Tensor, what: str = "schedule") -> torch.Tensor:
    """Check that ``betas`` is a 1-D float tensor with every value in the open interval (0, 1)."""
    if betas.ndim != 1 or betas.numel() < 1:
        raise ConfigError(f"{what}: betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    bad = ~torch.isfinite(betas) | (betas <= 0) | (betas >= 1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ConfigError(
            f"{what}: every beta must lie in (0, 1), but beta[{i}] = {betas[i].item():.6g} "
            f"({int(bad.sum())} of {betas.numel()} are outside); check beta_start / beta_end / num_timesteps"
        )
    return betas


def _check_T(num_timesteps: int) -> int:
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ConfigError(f"schedule.num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    return int(num_timesteps)


def _check_range(beta_start: float, beta_end: float, name: str) -> None:
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"schedule '{name}': {key}={value} is outside (0, 1); betas are variances of a step")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM (Ho et al. 2020, Sec. 4): betas linear from 1e-4 to 0.02 at T=1000, scaled by 1000/T
    for other T so that alpha_bar_T stays comparable (improved-diffusion's convention)."""
    T = _check_T(num_timesteps)
    _check_range(beta_start, beta_end, "linear")
    scale = 1000.0 / T
    betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
    return validate_betas(betas, "schedule 'linear'")


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021), eq. (17): alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999."""
    T = _check_T(num_timesteps)
    if not 0.0 < max_beta < 1.0:
        raise ConfigError(f"schedule 'cosine': max_beta={max_beta} is outside (0, 1)")
    if s < 0:
        raise ConfigError(f"schedule 'cosine': offset s={s} must be >= 0")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    return validate_betas(betas, "schedule 'cosine'")


def quadratic_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Quadratic in sqrt(beta) from beta_start to beta_end (DDPM's reference code 'quad' schedule)."""
    T = _check_T(num_timesteps)
    _check_range(beta_start, beta_end, "quadratic")
    scale = 1000.0 / T
    betas = torch.linspace(math.sqrt(scale * beta_start), math.sqrt(scale * beta_end), T, dtype=torch.float64) ** 2
    return validate_betas(betas, "schedule 'quadratic'")


def sigmoid_betas(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, steepness: float = 6.0
) -> torch.Tensor:
    """Sigmoid-shaped betas between beta_start and beta_end (GeoDiff, Xu et al. 2022)."""
    T = _check_T(num_timesteps)
    _check_range(beta_start, beta_end, "sigmoid")
    scale = 1000.0 / T
    x = torch.linspace(-steepness, steepness, T, dtype=torch.float64)
    betas = torch.sigmoid(x) * (beta_end - beta_start) * scale + beta_start * scale
    return validate_betas(betas, "schedule 'sigmoid'")
