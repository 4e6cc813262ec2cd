"""``Sampler``: an algorithm chosen by name, its options bound, and the grid it runs on; and
:func:`check_sampler_config`, the one place a sampler's configuration is checked."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ddpmlab.diffusion.gaussian import VARIANCES
from ddpmlab.diffusion.timesteps import SPACINGS, make_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import SamplerStep, chain, final
from ddpmlab.samplers.ddim import ddim_sample_progressive
from ddpmlab.samplers.ddpm import ddpm_sample_progressive
from ddpmlab.samplers.dpm_solver import dpm_solver_sample_progressive
from ddpmlab.samplers.repaint import repaint_sample_progressive, repaint_schedule

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
LOGSNR_AT_ZERO_SNR = (
    "sampler.spacing=logsnr spaces the grid uniformly in lambda = log(alpha_t / sigma_t) from t = T-1, where a "
    "zero-terminal-SNR schedule has lambda = -inf; use sampler.spacing=trailing (Lin et al. 2024, Sec. 3.3)"
)
_CALL_ARGS = {"generator", "cond", "x0", "keep"}  # given per call, not bound by the config


def _options_of(fn: Callable) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CALL_ARGS}


def _with_defaults(algorithm: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of ``algorithm``: the given ones, the function's defaults for the rest."""
    return {name: options.get(name, p.default) for name, p in _options_of(SAMPLERS[algorithm]).items()}


def _positive_int(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def _check_option(key: str, name: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if name == "eta" and not (number and value >= 0):
        what = "is outside" if number else "must be a number in"
        raise ConfigError(f"{key}.eta={value!r} {what} [0, inf); 0 is deterministic DDIM, 1 is DDPM-like")
    if name == "variance" and value not in VARIANCES:
        raise ConfigError(f"{key}.variance={value!r} must be one of {list(VARIANCES)}")
    if name == "clip_x0" and not isinstance(value, bool):
        raise ConfigError(f"{key}.clip_x0={value!r} must be true or false")
    if name in ("jump_length", "jump_n_sample") and not _positive_int(value):
        raise ConfigError(f"{key}.{name}={value!r} must be an integer >= 1 (1 and 1: no resampling)")


def check_sampler_config(config: Mapping[str, Any], T: int | None = None) -> None:
    """The one check of a sampler's configuration: the algorithm, ``num_steps``, ``spacing`` and every option, each
    key where ``config`` has it (a command line may give a few keys before the checkpoint that completes them is
    read), and, with the schedule's ``T``, the grid (num_steps at most T; RePaint's jumps shorter than the grid).
    The sampling functions only assert what this refuses. Messages name the key as configs spell it (``sampler.``;
    ``inpaint.`` for RePaint, whose options are the inpaint section's)."""
    algorithm = config.get("algorithm")
    if algorithm is not None and algorithm not in SAMPLERS:
        raise ConfigError(f"unknown sampler {algorithm!r}; choose one of {sorted(SAMPLERS)}")
    key = "inpaint" if algorithm in INPAINTING else "sampler"
    num_steps, spacing = config.get("num_steps"), config.get("spacing")
    if num_steps is not None and not _positive_int(num_steps):
        raise ConfigError(f"{key}.num_steps={num_steps!r} must be a positive integer, or null for all T steps")
    if T is not None and num_steps is not None and num_steps > T:
        raise ConfigError(
            f"{key}.num_steps={num_steps} is more than the schedule's T={T} steps; use at most {T}, "
            f"or null for all of them"
        )
    if "spacing" in config and spacing not in SPACINGS:
        raise ConfigError(f"unknown {key}.spacing {spacing!r}; choose one of {list(SPACINGS)}")
    options = {k: v for k, v in config.items() if k not in ("_target_", "algorithm", "num_steps", "spacing")}
    if algorithm is not None:
        allowed = _options_of(SAMPLERS[algorithm])
        unknown = set(options) - set(allowed)
        if unknown:
            raise ConfigError(
                f"sampler {algorithm!r} has no option(s) {sorted(unknown)}; its options are {sorted(allowed)}"
            )
        options = _with_defaults(algorithm, options)
    for name, value in options.items():
        _check_option(key, name, value)
    if algorithm == "repaint" and T is not None:
        S = T if num_steps is None else num_steps
        if options["jump_n_sample"] > 1 and options["jump_length"] >= S:
            raise ConfigError(
                f"inpaint.jump_length={options['jump_length']} must be smaller than the grid's {S} steps to resample "
                f"(inpaint.num_steps; or jump_n_sample=1: no resampling)"
            )


class Sampler:
    """A progressive sampler chosen by name, its options bound, and the grid it runs on.

    ``Sampler("ddim", num_steps=50, spacing="trailing", eta=0.0)``; options go to the algorithm (see
    :data:`SAMPLERS`), per-call inputs (``generator``, ``cond``, RePaint's ``x0`` / ``keep``) to ``__call__``.
    ``num_steps`` is the number of grid entries S, i.e. network evaluations per sample for every algorithm but
    RePaint, whose resampling revisits them (``num_evaluations`` counts them)."""

    def __init__(self, algorithm: str = "ddpm", num_steps: int | None = None, spacing: str = "leading", **options):
        check_sampler_config({"algorithm": algorithm, "num_steps": num_steps, "spacing": spacing, **options})
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
        """The grid this sampler visits on ``diffusion``'s schedule (descending code indices); a ConfigError if the
        schedule is too short for it."""
        check_sampler_config(self.to_config(), diffusion.T)
        if self.spacing == "logsnr" and float(diffusion.alpha_bar64[-1]) == 0:
            raise ConfigError(LOGSNR_AT_ZERO_SNR)
        return make_timesteps(diffusion.T, self.num_steps, self.spacing, alpha_bar=diffusion.alpha_bar64)

    def num_evaluations(self, diffusion) -> int:
        """Network evaluations per sample (= yielded steps): S, or RePaint's reverse steps with resampling."""
        S = self.timesteps(diffusion).numel()
        if self.algorithm != "repaint":
            return S
        opts = _with_defaults(self.algorithm, self.options)
        states = repaint_schedule(S, opts["jump_length"], opts["jump_n_sample"])
        return sum(k_next < k for k, k_next in itertools.pairwise(states))

    def steps(self, denoiser, x_T: Tensor, **kwargs) -> Iterator[SamplerStep]:
        """The progressive sampler on this grid of ``denoiser.diffusion``'s schedule."""
        return self.progressive(denoiser, x_T, self.timesteps(denoiser.diffusion), **kwargs)

    @torch.no_grad()
    def __call__(self, denoiser, x_T: Tensor, progress: Callable | None = None, **kwargs) -> Tensor:
        """x_0. ``progress``: an iterator wrapper that sees every step (``ddpmlab.progress.SamplingProgress.wrap``)."""
        steps = self.steps(denoiser, x_T, **kwargs)
        return final(progress(steps) if progress else steps)

    @torch.no_grad()
    def chain(self, denoiser, x_T: Tensor, num_frames: int = 10, progress: Callable | None = None, **kwargs) -> Tensor:
        """The x_T -> x_0 progression as [B, F, C, H, W] snapshots evenly spaced over the steps (F <= num_frames)."""
        steps = self.steps(denoiser, x_T, **kwargs)
        evaluations = self.num_evaluations(denoiser.diffusion)
        return chain(progress(steps) if progress else steps, x_T, evaluations, num_frames)
