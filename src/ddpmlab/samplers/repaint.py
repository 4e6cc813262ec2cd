"""RePaint inpainting (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models",
Algorithm 1), for any trained denoiser, unconditional or conditional (guided too: pass a GuidedDenoiser).

Every reverse step draws the unknown pixels from p_theta(x_{t-1} | x_t) (DDPM ancestral sampling) and replaces
the known pixels by the original noised to the same level, x_{t-1}^known ~ q(x_{t-1} | x_0). Resampling makes
the two parts agree: after every ``jump_length`` reverse steps the sample is diffused forward again by
``jump_length`` steps, q(x_t | x_{t-1}), and denoised anew, ``jump_n_sample`` times in all (the paper's j and
r, its Sec. 4.2; j = 10, r = 10 on 250 steps in its experiments). j = 1, r = 1 is plain replacement.

The steps run on a respaced grid (``make_timesteps``), as ``ddpm_sample_progressive``: state k = 0..S-1 is the
k-th smallest grid entry (the respaced process's index k), state -1 is x_0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.gaussian import VARIANCES, Variance
from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.samplers.base import SamplerStep, as_grid, batch_t, final, predict, randn_like
from ddpmlab.samplers.ddpm import ddpm_step


def repaint_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The states visited, from S-1 (x_T) down to -1 (x_0), one unit apart: a decrease is a reverse step, an
    increase a forward (re-noising) step. At every state k = 0, j, 2j, ... below S - j the walk jumps back up by
    j states, r - 1 times (the RePaint code's ``get_schedule_jump``, also diffusers' RePaintScheduler).
    ``Sampler`` checks the configuration: j, r >= 1, and j < S where it resamples."""
    assert jump_length >= 1 and jump_n_sample >= 1, (jump_length, jump_n_sample)
    assert jump_n_sample == 1 or jump_length < num_steps, (jump_length, num_steps)
    jumps = {k: jump_n_sample - 1 for k in range(0, num_steps - jump_length, jump_length)}
    states, k = [], num_steps
    while k >= 1:
        k -= 1
        states.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            for _ in range(jump_length):
                k += 1
                states.append(k)
    return states + [-1]


@torch.no_grad()
def repaint_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    x0: Tensor,
    keep: Tensor,
    generator: torch.Generator | None = None,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    variance: Variance = "small",
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield the sample after every reverse step (resampled states included); the last is the completion x_0.

    ``x0``: the original image(s) in [-1, 1], [B or 1, C, H, W]; ``keep``: 1 = known, 0 = to inpaint, broadcastable
    to x0 (e.g. [H,W] from ``samplers.masks``). Known pixels of the result equal ``x0`` exactly."""
    assert variance in VARIANCES, variance  # Sampler checks the configuration
    ts = as_grid(timesteps, denoiser.diffusion.T)
    process = denoiser.diffusion.respace(ts)  # its index k is the k-th smallest grid entry; the network sees t_of[k]
    t_of = ts.flip(0).tolist()  # t_of[k]: the network's code timestep at state k
    x0, keep = x0.to(x_T), keep.to(x_T)
    x = x_T
    states = repaint_schedule(len(t_of), jump_length, jump_n_sample)
    for k, k_next in itertools.pairwise(states):
        if k_next > k:  # Algorithm 1, line 10: back up one step, x_k ~ q(x_k | x_{k-1}) (DDPM eq. 2)
            x = process.q_step(x, batch_t(k_next, x), randn_like(x, generator))
            continue
        pred = predict(denoiser, x, t_of[k], cond, clip_x0)
        z = randn_like(x, generator) if k > 0 else None
        x_unknown = ddpm_step(pred, process, x, batch_t(k, x), z, variance)  # lines 6-7: p_theta(x_{t-1} | x_t)
        if k > 0:  # line 5: x_{t-1}^known ~ q(x_{t-1} | x_0), DDPM eq. (4), with fresh noise
            x_known = process.q_sample(x0, batch_t(k - 1, x), randn_like(x, generator))
        else:
            x_known = x0.expand_as(x)
        x = keep * x_known + (1 - keep) * x_unknown  # line 8
        yield SamplerStep(t_of[k], x, pred.x0_hat)


def repaint_sample(*args, **kwargs) -> Tensor:
    """The completion x_0 from :func:`repaint_sample_progressive` (same arguments)."""
    return final(repaint_sample_progressive(*args, **kwargs))
