"""``Sampler``: an algorithm chosen by name, its options bound and checked once, and the grid it runs on."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ddpmlab.diffusion.timesteps import SPACINGS, make_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import SamplerStep, chain, final
from ddpmlab.samplers.ddim import ddim_sample_progressive
from ddpmlab.samplers.ddpm import VARIANCES, ddpm_sample_progressive
from ddpmlab.samplers.dpm_solver import dpm_solver_sample_progressive
from ddpmlab.samplers.repaint import check_jumps, repaint_sample_progressive, repaint_schedule

# Samplers that draw from noise alone (what a training run's sampler config may choose) ...
ALGORITHMS: dict[str, Callable[..., Iterator[SamplerStep]]] = {
    "ddpm": ddpm_sample_progressive,
    "ddim": ddim_sample_progressive,
    "dpm_solver": dpm_solver_sample_progressive,
}
# ... and those that complete an image: x0= and keep= are given per call.
INPAINTING: dict[str, Callable[..., Iterator[SamplerStep]]] = {"repaint": repaint_sample_progressive}
SAMPLERS = {**ALGORITHMS, **INPAINTING}

_TARGET = "ddpmlab.samplers.Sampler"
_CALL_ARGS = {"generator", "cond", "x0", "keep"}  # given per call, not bound by the config


def _options_of(fn: Callable) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CALL_ARGS}


def _check_options(algorithm: str, options: dict) -> None:
    """Every option of every algorithm, checked where the config enters (not at the first sampling step)."""
    allowed = _options_of(SAMPLERS[algorithm])
    unknown = set(options) - set(allowed)
    if unknown:
        raise ConfigError(
            f"sampler {algorithm!r} has no option(s) {sorted(unknown)}; its options are {sorted(allowed)}"
        )
    value = {name: options.get(name, p.default) for name, p in allowed.items()}
    if "variance" in value and value["variance"] not in VARIANCES:
        raise ConfigError(f"sampler.variance={value['variance']!r} must be one of {list(VARIANCES)}")
    if "eta" in value and not float(value["eta"]) >= 0:
        raise ConfigError(f"sampler.eta={value['eta']} must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    if algorithm == "repaint":
        check_jumps(value["jump_length"], value["jump_n_sample"])


class Sampler:
    """A progressive sampler chosen by name, its options bound, and the grid it runs on.

    ``Sampler("ddim", num_steps=50, spacing="trailing", eta=0.0)``; options go to the algorithm (see
    :data:`SAMPLERS`), per-call inputs (``generator``, ``cond``, RePaint's ``x0`` / ``keep``) to ``__call__``.
    ``num_steps`` is the number of grid entries S, i.e. network evaluations per sample for every algorithm but
    RePaint, whose resampling revisits them (``num_evaluations`` counts them)."""

    def __init__(self, algorithm: str = "ddpm", num_steps: int | None = None, spacing: str = "leading", **options):
        if algorithm not in SAMPLERS:
            raise ConfigError(f"unknown sampler {algorithm!r}; choose one of {sorted(SAMPLERS)}")
        if spacing not in SPACINGS:
            raise ConfigError(f"unknown sampler.spacing {spacing!r}; choose one of {list(SPACINGS)}")
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
            raise ConfigError(f"sampler.num_steps={num_steps!r} must be a positive integer, or null for all T steps")
        _check_options(algorithm, options)
        self.algorithm, self.num_steps, self.spacing, self.options = algorithm, num_steps, spacing, options
        self.progressive = partial(SAMPLERS[algorithm], **options)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> "Sampler":
        """A Sampler from a sampler config (a checkpoint's ``sampler`` section: primitives, its ``_target_`` only
        checked, never imported) with ``overrides`` on top. Overrides that name an ``algorithm`` replace the
        config whole (a different algorithm has other options); otherwise they change single keys of it."""
        overrides = dict(overrides or {})
        base = {} if overrides.get("algorithm") is not None else dict(config or {})
        merged = {**base, **overrides}
        target = merged.pop("_target_", _TARGET)
        if target != _TARGET:
            raise ConfigError(f"sampler config names {target!r}; ddpmlab builds only {_TARGET}")
        return cls(**merged)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"Sampler({self.algorithm!r}, num_steps={self.num_steps}, spacing={self.spacing!r}{opts})"

    def to_config(self) -> dict:
        """The sampler as a config (``_target_`` and primitives): what ``instantiate`` turns back into it."""
        return {"_target_": _TARGET, "algorithm": self.algorithm, "num_steps": self.num_steps,
                "spacing": self.spacing, **self.options}  # fmt: skip

    def with_steps(self, num_steps: int | None) -> "Sampler":
        """The same algorithm and options on a grid of ``num_steps`` steps."""
        return Sampler(self.algorithm, num_steps, self.spacing, **self.options)

    def timesteps(self, diffusion) -> Tensor:
        """The grid this sampler visits on ``diffusion``'s schedule (descending code indices)."""
        return make_timesteps(diffusion.T, self.num_steps, self.spacing, alpha_bar=diffusion.alpha_bar64)

    def num_evaluations(self, diffusion) -> int:
        """Network evaluations per sample (= yielded steps): S, or RePaint's reverse steps with resampling."""
        S = self.timesteps(diffusion).numel()
        if self.algorithm != "repaint":
            return S
        opts = {**{k: p.default for k, p in _options_of(INPAINTING["repaint"]).items()}, **self.options}
        states = repaint_schedule(S, opts["jump_length"], opts["jump_n_sample"])
        return sum(k_next < k for k, k_next in zip(states, states[1:]))

    def steps(self, denoiser, diffusion, x_T: Tensor, **kwargs) -> Iterator[SamplerStep]:
        return self.progressive(denoiser, diffusion, x_T, self.timesteps(diffusion), **kwargs)

    @torch.no_grad()
    def __call__(self, denoiser, diffusion, x_T: Tensor, progress: Callable | None = None, **kwargs) -> Tensor:
        """x_0. ``progress``: an iterator wrapper that sees every step (``ddpmlab.progress.SamplingProgress.wrap``)."""
        steps = self.steps(denoiser, diffusion, x_T, **kwargs)
        return final(progress(steps) if progress else steps)

    @torch.no_grad()
    def chain(
        self, denoiser, diffusion, x_T: Tensor, num_frames: int = 10, progress: Callable | None = None, **kwargs
    ) -> Tensor:
        """The x_T -> x_0 progression as [B, F, C, H, W] snapshots evenly spaced over the steps (F <= num_frames)."""
        steps = self.steps(denoiser, diffusion, x_T, **kwargs)
        return chain(progress(steps) if progress else steps, x_T, self.num_evaluations(diffusion), num_frames)
