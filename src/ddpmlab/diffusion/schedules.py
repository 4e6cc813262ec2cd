"""Beta schedules: pure functions returning float64 betas of shape [T], each validated.

Every schedule takes ``zero_terminal_snr`` (config: ``schedule.zero_terminal_snr``): true rescales it to
alpha_bar_T = 0 (:func:`rescale_zero_terminal_snr`), so that training sees pure noise at t = T as sampling starts
from it. The network must then predict v or x0 (``validate.check_zero_terminal_snr``)."""

from __future__ import annotations

import math

import torch

from ddpmlab.errors import ConfigError


def validate_betas(betas: torch.Tensor, what: str = "schedule", zero_terminal_snr: bool = False) -> torch.Tensor:
    """Check that ``betas`` is a 1-D float tensor with every value in the open interval (0, 1); with
    ``zero_terminal_snr`` the last beta may also be exactly 1 (alpha_bar_T = 0, Lin et al. 2024)."""
    if betas.ndim != 1 or betas.numel() < 1:
        raise ConfigError(f"{what}: betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    good = torch.isfinite(betas) & (betas > 0) & (betas < 1)
    if zero_terminal_snr:
        good[-1] |= betas[-1] == 1  # alpha_bar_T = 0: x_T is pure noise
    bad = ~good
    if bad.any():
        i = int(bad.nonzero()[0])
        interval = "(0, 1) (the last may be 1)" if zero_terminal_snr else "(0, 1)"
        raise ConfigError(
            f"{what}: every beta must lie in {interval}, but beta[{i}] = {betas[i].item():.6g} "
            f"({int(bad.sum())} of {betas.numel()} are outside); check beta_start / beta_end / num_timesteps"
        )
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1: the schedule
    moved to zero terminal SNR, alpha_bar_T = 0 exactly (beta_T = 1), with alpha_bar_1 kept. In float64."""
    betas = validate_betas(torch.as_tensor(betas, dtype=torch.float64), "schedule")
    if betas.numel() < 2:
        raise ConfigError(
            "schedule.zero_terminal_snr=true needs num_timesteps >= 2 (alpha_bar_1 kept, alpha_bar_T = 0)"
        )
    sqrt_alpha_bar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = sqrt_alpha_bar - last  # Algorithm 1: shift so the last timestep is zero
    sqrt_alpha_bar = sqrt_alpha_bar * (first / (first - last))  # scale so the first timestep is back to its value
    alpha_bar = sqrt_alpha_bar**2  # revert the sqrt
    alpha = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # revert the cumprod
    return validate_betas(1 - alpha, "schedule (zero terminal SNR)", zero_terminal_snr=True)


def _check_T(num_timesteps: int) -> int:
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ConfigError(f"schedule.num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    return int(num_timesteps)


def _check_range(beta_start: float, beta_end: float, name: str) -> None:
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"schedule '{name}': {key}={value} is outside (0, 1); betas are variances of a step")


def linear_betas(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False
) -> torch.Tensor:
    """DDPM (Ho et al. 2020, Sec. 4): betas linear from 1e-4 to 0.02 at T=1000, scaled by 1000/T
    for other T so that alpha_bar_T stays comparable (improved-diffusion's convention)."""
    T = _check_T(num_timesteps)
    _check_range(beta_start, beta_end, "linear")
    scale = 1000.0 / T
    betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
    betas = validate_betas(betas, "schedule 'linear'")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def cosine_betas(
    num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, zero_terminal_snr: bool = False
) -> torch.Tensor:
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
    betas = validate_betas(betas, "schedule 'cosine'")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def quadratic_betas(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False
) -> torch.Tensor:
    """Quadratic in sqrt(beta) from beta_start to beta_end (DDPM's reference code 'quad' schedule)."""
    T = _check_T(num_timesteps)
    _check_range(beta_start, beta_end, "quadratic")
    scale = 1000.0 / T
    betas = torch.linspace(math.sqrt(scale * beta_start), math.sqrt(scale * beta_end), T, dtype=torch.float64) ** 2
    betas = validate_betas(betas, "schedule 'quadratic'")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def sigmoid_betas(
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    steepness: float = 6.0,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Sigmoid-shaped betas between beta_start and beta_end (GeoDiff, Xu et al. 2022)."""
    T = _check_T(num_timesteps)
    _check_range(beta_start, beta_end, "sigmoid")
    scale = 1000.0 / T
    x = torch.linspace(-steepness, steepness, T, dtype=torch.float64)
    betas = torch.sigmoid(x) * (beta_end - beta_start) * scale + beta_start * scale
    betas = validate_betas(betas, "schedule 'sigmoid'")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def listed_betas(betas: list[float], zero_terminal_snr: bool = False) -> torch.Tensor:
    """The betas given one by one (diffusers' ``trained_betas``): any schedule, T = len(betas). The last may be 1
    (a zero-terminal-SNR schedule written out); ``zero_terminal_snr`` rescales one that is not yet."""
    betas = validate_betas(torch.as_tensor(betas, dtype=torch.float64).flatten(), "schedule 'listed'", True)
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr and betas[-1] != 1 else betas
