"""Sampling grids: the one place where the timesteps a sampler visits are decided."""

from __future__ import annotations

import math

import torch

from ddpmlab.errors import ConfigError

SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def make_timesteps(T: int, num_steps: int | None = None, spacing: str = "leading") -> torch.Tensor:
    """Return the S = ``num_steps`` code indices (in 0..T-1) a sampler visits, in visiting (descending) order.

    - ``leading``: 0, k, 2k, ... with k = T // S (DDIM's "uniform" skip; diffusers' "leading").
    - ``trailing``: T-1, T-1-T/S, ... rounded (Lin et al. 2024, "Common diffusion noise schedules ..."),
      which always starts at the noisiest step.
    - ``linspace``: S points evenly spaced from 0 to T-1, rounded.
    - ``quadratic``: DDIM's CIFAR-10 choice, floor(linspace(0, sqrt(0.8 T), S)^2).
    """
    S = T if num_steps is None else int(num_steps)
    if not 1 <= S <= T:
        raise ConfigError(f"sampler.num_steps={num_steps} must be between 1 and the schedule's T={T}")
    if spacing == "leading":
        step = T // S
        ts = torch.arange(S, dtype=torch.float64) * step
    elif spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / S, dtype=torch.float64)[:S]) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, T - 1, S, dtype=torch.float64))
    elif spacing == "quadratic":
        ts = torch.floor(torch.linspace(0, math.sqrt(T * 0.8), S, dtype=torch.float64) ** 2)
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    ts = ts.long().clamp(0, T - 1)
    if ts.unique().numel() != S:
        raise ConfigError(f"spacing {spacing!r} with num_steps={S} and T={T} repeats timesteps; use fewer steps or another spacing")
    return ts.sort(descending=True).values
