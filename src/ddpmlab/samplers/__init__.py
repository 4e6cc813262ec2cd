"""Samplers: pure functions ``(denoiser, diffusion, x_T, timesteps, *, generator, ...) -> x_0``, each with
a progressive twin that yields every step. :class:`Sampler` binds one to its grid, as configs choose it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor

from ddpmlab.diffusion.timesteps import SPACINGS, make_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import SamplerStep, chain, final
from ddpmlab.samplers.ddim import ddim_sample, ddim_sample_progressive, ddim_step
from ddpmlab.samplers.ddpm import ddpm_sample, ddpm_sample_progressive, ddpm_step
from ddpmlab.samplers.dpm_solver import dpm_solver_sample, dpm_solver_sample_progressive
from ddpmlab.samplers.guidance import GuidedDenoiser
from ddpmlab.samplers.repaint import repaint_sample, repaint_sample_progressive

ALGORITHMS: dict[str, Callable[..., Iterator[SamplerStep]]] = {
    "ddpm": ddpm_sample_progressive,
    "ddim": ddim_sample_progressive,
    "dpm_solver": dpm_solver_sample_progressive,
}

_CALL_ARGS = {"generator", "cond"}  # given per call, not bound by the config


def _options_of(fn: Callable) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY} - _CALL_ARGS


class Sampler:
    """A progressive sampler chosen by name, its options bound, and the grid it runs on.

    ``Sampler("ddim", num_steps=50, spacing="trailing", eta=0.0)``; options go to the algorithm.
    """

    def __init__(self, algorithm: str = "ddpm", num_steps: int | None = None, spacing: str = "leading", **options):
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown sampler {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
        if spacing not in SPACINGS:
            raise ConfigError(f"unknown sampler.spacing {spacing!r}; choose one of {list(SPACINGS)}")
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
            raise ConfigError(f"sampler.num_steps={num_steps!r} must be a positive integer, or null for all T steps")
        unknown = set(options) - _options_of(ALGORITHMS[algorithm])
        if unknown:
            raise ConfigError(
                f"sampler {algorithm!r} has no option(s) {sorted(unknown)}; its options are {sorted(_options_of(ALGORITHMS[algorithm]))}"
            )
        self.algorithm, self.num_steps, self.spacing, self.options = algorithm, num_steps, spacing, options
        self.progressive = partial(ALGORITHMS[algorithm], **options)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"Sampler({self.algorithm!r}, num_steps={self.num_steps}, spacing={self.spacing!r}{opts})"

    def with_steps(self, num_steps: int | None) -> "Sampler":
        """The same algorithm and options on a grid of ``num_steps`` steps."""
        return Sampler(self.algorithm, num_steps, self.spacing, **self.options)

    def timesteps(self, diffusion) -> Tensor:
        """The grid this sampler visits on ``diffusion``'s schedule (descending code indices)."""
        alpha_bar = torch.cumprod(1.0 - diffusion.beta64, 0)
        return make_timesteps(diffusion.T, self.num_steps, self.spacing, alpha_bar=alpha_bar)

    def steps(self, denoiser, diffusion, x_T: Tensor, **kwargs) -> Iterator[SamplerStep]:
        return self.progressive(denoiser, diffusion, x_T, self.timesteps(diffusion), **kwargs)

    @torch.no_grad()
    def __call__(self, denoiser, diffusion, x_T: Tensor, progress: Callable | None = None, **kwargs) -> Tensor:
        """x_0. ``progress``: an iterator wrapper that sees every step (``ddpmlab.progress.SamplingProgress.wrap``)."""
        steps = self.steps(denoiser, diffusion, x_T, **kwargs)
        return final(progress(steps) if progress else steps)

    @torch.no_grad()
    def chain(self, denoiser, diffusion, x_T: Tensor, num_frames: int = 10, progress: Callable | None = None,
              **kwargs) -> Tensor:
        """The x_T -> x_0 progression as [B, F, C, H, W] snapshots evenly spaced over the steps (F <= num_frames)."""
        num_steps = self.timesteps(diffusion).numel()
        steps = self.steps(denoiser, diffusion, x_T, **kwargs)
        return chain(progress(steps) if progress else steps, x_T, num_steps, num_frames)

    def num_evals(self, diffusion) -> int:
        """Network evaluations per call (one per visited timestep)."""
        return self.timesteps(diffusion).numel()


__all__ = [
    "ALGORITHMS",
    "GuidedDenoiser",
    "Sampler",
    "SamplerStep",
    "chain",
    "ddim_sample",
    "ddim_sample_progressive",
    "ddim_step",
    "ddpm_sample",
    "ddpm_sample_progressive",
    "ddpm_step",
    "dpm_solver_sample",
    "dpm_solver_sample_progressive",
    "final",
    "repaint_sample",
    "repaint_sample_progressive",
]
