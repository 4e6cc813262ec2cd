"""Samplers: pure functions ``(denoiser, diffusion, x_T, timesteps, *, generator, ...) -> x_0``, each with
a progressive twin that yields every step. :class:`Sampler` binds one to its grid, as configs choose it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor

from ddpmlab.diffusion.timesteps import make_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import SamplerStep, final
from ddpmlab.samplers.ddim import ddim_sample, ddim_sample_progressive
from ddpmlab.samplers.ddpm import ddpm_sample, ddpm_sample_progressive


ALGORITHMS: dict[str, Callable[..., Iterator[SamplerStep]]] = {
    "ddpm": ddpm_sample_progressive,
    "ddim": ddim_sample_progressive,
}


class Sampler:
    """A progressive sampler chosen by name, its options bound, and the grid it runs on.

    ``Sampler("ddim", num_steps=50, spacing="trailing", eta=0.0)``; options go to the algorithm.
    """

    def __init__(self, algorithm: str = "ddpm", num_steps: int | None = None, spacing: str = "leading", **options):
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown sampler {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
        self.algorithm, self.num_steps, self.spacing, self.options = algorithm, num_steps, spacing, options
        self.progressive = partial(ALGORITHMS[algorithm], **options)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"Sampler({self.algorithm!r}, num_steps={self.num_steps}, spacing={self.spacing!r}{opts})"

    def with_steps(self, num_steps: int | None) -> "Sampler":
        """The same algorithm and options on a grid of ``num_steps`` steps."""
        return Sampler(self.algorithm, num_steps, self.spacing, **self.options)

    def timesteps(self, T: int) -> Tensor:
        return make_timesteps(T, self.num_steps, self.spacing)

    def steps(self, denoiser, diffusion, x_T: Tensor, **kwargs) -> Iterator[SamplerStep]:
        return self.progressive(denoiser, diffusion, x_T, self.timesteps(diffusion.T), **kwargs)

    @torch.no_grad()
    def __call__(self, denoiser, diffusion, x_T: Tensor, **kwargs) -> Tensor:
        return final(self.steps(denoiser, diffusion, x_T, **kwargs))


__all__ = [
    "ALGORITHMS",
    "Sampler",
    "SamplerStep",
    "ddim_sample",
    "ddim_sample_progressive",
    "ddpm_sample",
    "ddpm_sample_progressive",
    "final",
]
