"""What every sampler shares: the step record, the denoiser call (with optional clipping), the grid's
alpha_bar, noise drawing, and the helpers that consume a progressive sampler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ddpmlab.diffusion.gaussian import GaussianDiffusion
from ddpmlab.diffusion.parameterization import Denoiser, Prediction, shift_score
from ddpmlab.diffusion.parameterization import clip_x0 as _clip
from ddpmlab.errors import ConfigError


class SamplerStep(NamedTuple):
    t: int  # the code timestep just denoised (the network saw this t)
    x: Tensor  # the new, less noisy sample: x_prev    [B,C,H,W]
    x0_hat: Tensor  # the prediction of x0 at this step [B,C,H,W]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def batch_t(t: Tensor | int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def as_grid(timesteps: Tensor | list[int], T: int) -> Tensor:
    """A visiting grid as a CPU LongTensor: distinct, strictly descending code indices in 0..T-1, as
    ``make_timesteps`` builds them (``Sampler`` checks the configuration it is built from)."""
    ts = torch.as_tensor(timesteps, dtype=torch.long).flatten().cpu()
    assert ts.numel() > 0 and 0 <= ts.min() and ts.max() < T and bool((ts[1:] < ts[:-1]).all()), (
        f"timesteps must be strictly descending indices in [0, {T - 1}] (use make_timesteps), got {ts.tolist()[:8]}"
    )
    return ts


def grid_alpha_bar(diffusion: GaussianDiffusion, ts: Tensor) -> tuple[Tensor, Tensor]:
    """float64 alpha_bar at each grid entry and at the entry after it (the step's target); after the last entry
    the target is x_0 itself, alpha_bar = 1 (DDIM's convention, alpha_0 := 1). Both [S]."""
    alpha_bar = diffusion.alpha_bar64[ts]
    alpha_bar_prev = torch.cat([alpha_bar[1:], torch.ones(1, dtype=torch.float64)])
    return alpha_bar, alpha_bar_prev


def predict(
    denoiser: Denoiser,
    x_t: Tensor,
    t: int,
    cond: Tensor | None,
    clip_x0: bool,
    keep_guide_grad: bool = False,
) -> Prediction:
    """The network's Prediction(eps_hat, x0_hat) at code timestep ``t`` of its own ``denoiser.diffusion``; with
    ``clip_x0``, x0_hat is clipped to the data range (the denoiser's ``x0_range``, [-1, 1]; None for latents: no
    clipping) and eps_hat re-derived from the clipped x0_hat (so the step stays consistent).

    A classifier-guided prediction's gradient is applied to eps_hat here (Dhariwal & Nichol 2021, Algorithm 2), as
    every eps-based sampler needs it, unless ``keep_guide_grad``: ancestral sampling shifts its mean instead
    (Algorithm 1)."""
    diffusion = denoiser.diffusion  # the network's own schedule, also on a respaced grid: t is an original index
    t_batch = batch_t(t, x_t)
    pred = denoiser(x_t, t_batch, cond)
    x0_range = getattr(denoiser, "x0_range", (-1.0, 1.0))
    if clip_x0 and x0_range is not None:
        pred = _clip(pred, diffusion, x_t, t_batch, *x0_range)
    return pred if keep_guide_grad else shift_score(pred, diffusion, x_t, t_batch)


def final(steps: Iterator[SamplerStep]) -> Tensor:
    """Run a progressive sampler to the end and return x_0."""
    x = None
    for step in steps:
        x = step.x
    if x is None:
        raise ValueError("the sampler visited no timestep")
    return x


def chain(steps: Iterator[SamplerStep], x_T: Tensor, num_steps: int, num_frames: int) -> Tensor:
    """The denoising chain x_T -> x_0 of a progressive sampler that takes ``num_steps`` steps, as ``num_frames``
    snapshots evenly spaced over its steps, the first x_T and the last x_0: [B, F, C, H, W] (rows = samples,
    columns = steps; F = min(num_frames, num_steps + 1))."""
    if num_frames < 2:
        raise ConfigError(f"a denoising chain needs at least 2 frames (x_T and x_0), got {num_frames}")
    picks = {round(k * num_steps / (num_frames - 1)) for k in range(num_frames)}  # indices into x_T, x_1st, ...
    frames = [x_T] if 0 in picks else []
    for i, step in enumerate(steps, start=1):
        if i in picks:
            frames.append(step.x)
    if len(frames) != len(picks):
        raise ValueError(f"the sampler took fewer than num_steps={num_steps} steps")
    return torch.stack(frames, 1)
