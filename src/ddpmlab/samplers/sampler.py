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
from ddpmlab.samplers.edm import euler_sample_progressive, heun_sample_progressive
from ddpmlab.samplers.repaint import repaint_sample_progressive, repaint_schedule
from ddpmlab.samplers.unipc import unipc_sample_progressive

# Samplers that draw from noise alone (what a training run's sampler config may choose) ...
ALGORITHMS: dict[str, Callable[..., Iterator[SamplerStep]]] = {
    "ddpm": ddpm_sample_progressive,
    "ddim": ddim_sample_progressive,
    "dpm_solver": dpm_solver_sample_progressive,
    "unipc": unipc_sample_progressive,
    "euler": euler_sample_progressive,
    "heun": heun_sample_progressive,
}
# ... and those that complete an image: x0= and keep= are given per call.
INPAINTING: dict[str, Callable[..., Iterator[SamplerStep]]] = {"repaint": repaint_sample_progressive}
SAMPLERS = {**ALGORITHMS, **INPAINTING}


def _repaint_evaluations(S: int, options: Mapping[str, Any]) -> int:
    states = repaint_schedule(S, options["jump_length"], options["jump_n_sample"])
    return sum(k_next < k for k, k_next in itertools.pairwise(states))


# Network evaluations per sample on a grid of S entries, where they are not S (one per entry), and how to say it.
EVALUATIONS: dict[str, tuple[str, Callable[[int, Mapping[str, Any]], int]]] = {
    "heun": ("2S-1", lambda S, options: 2 * S - 1),  # a correction after every step but the last (EDM Algorithm 1)
    "repaint": ("S + its resampling's", _repaint_evaluations),
}


def num_evaluations(algorithm: str, S: int, options: Mapping[str, Any] | None = None) -> int:
    """Network evaluations per sample of ``algorithm`` (with ``options``) on a grid of S entries."""
    if algorithm not in EVALUATIONS:
        return S
    return EVALUATIONS[algorithm][1](S, _with_defaults(algorithm, options or {}))


def _valid(algorithm: str, S: int, options: Mapping[str, Any] | None) -> bool:
    """Whether ``algorithm`` runs on a grid of S entries (RePaint resamples only on grids longer than its jumps)."""
    try:
        check_sampler_config({"algorithm": algorithm, "num_steps": S, **(options or {})}, T=S)
    except ConfigError:
        return False
    return True


def steps_for_nfe(algorithm: str, nfe: int, options: Mapping[str, Any] | None = None) -> int:
    """The grid size S at which ``algorithm`` takes exactly ``nfe`` network evaluations per sample; a ConfigError
    naming the nearest reachable budgets where none does."""
    if algorithm not in SAMPLERS:
        raise ConfigError(f"unknown sampler {algorithm!r}; choose one of {sorted(SAMPLERS)}")
    if not _positive_int(nfe):
        raise ConfigError(f"nfe={nfe!r} must be a positive integer (network evaluations per sample)")
    counts = {S: num_evaluations(algorithm, S, options) for S in range(1, nfe + 2) if _valid(algorithm, S, options)}
    # every algorithm takes at least S evaluations on S entries: S <= nfe
    exact = [S for S, n in counts.items() if n == nfe]
    if exact:
        return exact[0]
    below = max((S for S, n in counts.items() if n < nfe), default=None)  # counts grow with S
    above = min(S for S, n in counts.items() if n > nfe)
    formula = EVALUATIONS[algorithm][0]
    use = f"nfe={counts[above]} (S={above})"
    if below is not None:
        use = f"nfe={counts[below]} (S={below}) or {counts[above]} (S={above})"
    raise ConfigError(f"{algorithm} takes {formula} evaluations: nfe={nfe} is not reachable; use {use}")


_TARGET = "ddpmlab.samplers.Sampler"


def zero_snr_refusal(algorithm: str | None, spacing: str | None, visits_T: bool = True) -> str | None:
    """Why a sampler cannot run on a zero-terminal-SNR schedule (alpha_bar_T = 0, Lin et al. 2024), or None: the
    grids spaced in lambda or sigma start at lambda = -inf / sigma = inf, and EDM's samplers integrate in sigma."""
    if spacing in ("logsnr", "karras"):
        axis, value = ("lambda = log(alpha_t / sigma_t)", "lambda = -inf") if spacing == "logsnr" else (
            "sigma = sqrt((1 - alpha_bar) / alpha_bar)", "sigma = inf")  # fmt: skip
        return (
            f"sampler.spacing={spacing} spaces the grid in {axis} from t = T-1, where a zero-terminal-SNR schedule has "
            f"{value}; use sampler.spacing=trailing (Lin et al. 2024, Sec. 3.3)"
        )
    if algorithm in ("euler", "heun") and visits_T:
        return (
            f"sampler {algorithm} integrates in sigma = sqrt((1 - alpha_bar) / alpha_bar), infinite at T-1 of a "
            "zero-terminal-SNR schedule; use ddim, ddpm, dpm_solver or unipc with sampler.spacing=trailing"
        )
    return None


_CALL_ARGS = {"generator", "cond", "x0", "keep"}  # given per call, not bound by the config


def _options_of(fn: Callable) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CALL_ARGS}


def _with_defaults(algorithm: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of ``algorithm``: the given ones, the function's defaults for the rest."""
    return {name: options.get(name, p.default) for name, p in _options_of(SAMPLERS[algorithm]).items()}


def default_options(algorithm: str) -> dict[str, Any]:
    """Every option of ``algorithm`` at its default."""
    return _with_defaults(algorithm, {})


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
    if name == "order" and value not in (2, 3):
        raise ConfigError(f"{key}.order={value!r} must be 2 or 3 (the solver's order of accuracy)")
    if name in ("S_churn", "S_tmin") and not (number and value >= 0):
        raise ConfigError(f"{key}.{name}={value!r} must be a number >= 0 (S_churn=0: no churn, the ODE)")
    if name == "S_noise" and not (number and value > 0):
        raise ConfigError(f"{key}.S_noise={value!r} must be a number > 0 (1: the churn adds unit-variance noise)")
    if name == "S_tmax" and value is not None and not (number and value >= 0):
        raise ConfigError(f"{key}.S_tmax={value!r} must be a number >= 0, or null for no upper limit")


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
    S_tmin, S_tmax = options.get("S_tmin", 0.0), options.get("S_tmax")
    if S_tmax is not None and S_tmin is not None and S_tmin > S_tmax:
        raise ConfigError(f"{key}.S_tmin={S_tmin} is above {key}.S_tmax={S_tmax}: the churn would apply nowhere")
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
    Heun (2S - 1) and RePaint, whose resampling revisits them (``num_evaluations`` counts them; ``for_nfe`` picks S
    for a budget)."""

    def __init__(self, algorithm: str = "ddpm", num_steps: int | None = None, spacing: str = "leading", **options):
        check_sampler_config({"algorithm": algorithm, "num_steps": num_steps, "spacing": spacing, **options})
        order = list(_options_of(SAMPLERS[algorithm]))  # the signature's order, whatever order a config gave them in
        options = dict(sorted(options.items(), key=lambda kv: order.index(kv[0])))
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
        if float(diffusion.alpha_bar64[-1]) == 0 and (why := zero_snr_refusal(None, self.spacing)):
            raise ConfigError(why)
        ts = make_timesteps(diffusion.T, self.num_steps, self.spacing, alpha_bar=diffusion.alpha_bar64)
        if float(diffusion.alpha_bar64[ts[0]]) == 0 and (why := zero_snr_refusal(self.algorithm, None)):
            raise ConfigError(why)
        return ts

    def for_nfe(self, nfe: int) -> "Sampler":
        """The same algorithm and options on the grid that takes exactly ``nfe`` network evaluations per sample
        (S = nfe but for Heun, 2S - 1, and RePaint); a ConfigError naming the nearest budgets if none does."""
        return self.with_steps(steps_for_nfe(self.algorithm, nfe, self.options))

    def num_evaluations(self, diffusion) -> int:
        """Network evaluations per sample (= yielded steps: every sampler yields once per evaluation): S, Heun's
        2S - 1 (a correction after every step but the last), or RePaint's reverse steps with resampling."""
        return num_evaluations(self.algorithm, self.timesteps(diffusion).numel(), self.options)

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
