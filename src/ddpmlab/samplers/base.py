"""What every sampler shares: the step record, noise drawing and the run-to-the-end helper."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor


class SamplerStep(NamedTuple):
    t: int  # the code timestep just denoised (the network saw this t)
    x: Tensor  # the new, less noisy sample: x_prev    [B,C,H,W]
    x0_hat: Tensor  # the prediction of x0 at this step [B,C,H,W]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def final(steps: Iterator[SamplerStep]) -> Tensor:
    """Run a progressive sampler to the end and return x_0."""
    x = None
    for step in steps:
        x = step.x
    if x is None:
        raise ValueError("the sampler visited no timestep")
    return x


def batch_t(t: Tensor | int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def as_grid(timesteps: Tensor | list[int], T: int) -> Tensor:
    """Validate a visiting grid: distinct, strictly descending code indices in 0..T-1."""
    ts = torch.as_tensor(timesteps, dtype=torch.long).flatten().cpu()
    if ts.numel() == 0 or ts.min() < 0 or ts.max() >= T or (ts.numel() > 1 and not (ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending indices in [0, {T - 1}], got {ts.tolist()[:8]}...")
    return ts
