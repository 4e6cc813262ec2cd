"""Diffusion math (pure torch): schedules, the Gaussian forward/reverse process, parameterizations.

Index convention: the code's timestep index ``t`` runs over ``0..T-1`` and stands for the paper's step
``t+1`` (DDPM numbers steps ``1..T``). So ``alpha_bar[t]`` is the paper's alpha_bar_{t+1}, ``t = 0`` is
the last reverse step (x_1 -> x_0), and ``alpha_bar_prev[0] = 1`` is alpha_bar_0.
"""

from ddpmlab.diffusion.gaussian import GaussianDiffusion, extract
from ddpmlab.diffusion.parameterization import Denoiser, Prediction
from ddpmlab.diffusion.schedules import (
    cosine_betas,
    linear_betas,
    quadratic_betas,
    rescale_zero_terminal_snr,
    sigmoid_betas,
    validate_betas,
)
from ddpmlab.diffusion.timesteps import make_timesteps

__all__ = [
    "Denoiser",
    "GaussianDiffusion",
    "Prediction",
    "cosine_betas",
    "extract",
    "linear_betas",
    "make_timesteps",
    "quadratic_betas",
    "rescale_zero_terminal_snr",
    "sigmoid_betas",
    "validate_betas",
]
