"""Sampling grids: the one place where the timesteps a sampler visits are decided.

A grid is a descending LongTensor of S distinct code indices in 0..T-1 (code index t is the paper's step
t+1). Samplers take it as given; what a step needs about its neighbour (alpha_bar of the next grid entry, or
the respaced betas of ancestral sampling, ``GaussianDiffusion.respace``) comes from the grid, never from
arithmetic on t.

The float arithmetic below mirrors the reference code (DDIM's ``numpy.linspace``, diffusers' ``numpy.arange``)
operation for operation, so that the same (T, S, spacing) gives the same integers as those implementations.
"""

from __future__ import annotations

import math

import torch

SPACINGS = ("leading", "trailing", "linspace", "quadratic", "logsnr", "karras")


def _linspace(stop: float, S: int) -> list[float]:
    """``numpy.linspace(0, stop, S)``: i * (stop / (S - 1)), with the end point exactly ``stop``."""
    if S == 1:
        return [0.0]
    step = stop / (S - 1)
    return [i * step for i in range(S - 1)] + [float(stop)]


def _nearest(table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each target, the position in the ascending ``table`` of the nearest value (the lower one on a tie)."""
    n = table.numel()
    hi = torch.searchsorted(table, targets).clamp(1, max(n - 1, 1))
    return torch.where(targets - table[hi - 1] <= table[hi.clamp(max=n - 1)] - targets, hi - 1, hi).clamp(max=n - 1)


def _logsnr_grid(alpha_bar: torch.Tensor, S: int) -> list[int]:
    """For S values spaced uniformly in lambda = log(alpha_t / sigma_t) = 0.5 log(alpha_bar / (1 - alpha_bar)) from
    lambda(T-1) to lambda(0), the code index with the nearest lambda (several may land on one index where lambda moves
    fast: near t = 0, and near T-1 for the cosine schedule)."""
    T = alpha_bar.numel()
    lam = (0.5 * torch.log(alpha_bar / (1 - alpha_bar))).flip(0).contiguous()  # ascending; position p: index T-1-p
    targets = lam[0] + torch.tensor(_linspace(float(lam[-1] - lam[0]), S), dtype=torch.float64)
    return (T - 1 - _nearest(lam, targets)).tolist()


def _karras_grid(alpha_bar: torch.Tensor, S: int, rho: float = 7.0) -> list[int]:
    """EDM's noise levels (Karras et al. 2022, eq. 5) for the VP model's sigma = sqrt((1 - alpha_bar) / alpha_bar),
    each rounded to the code index with the nearest log sigma (ascending in t: position = code index)."""
    log_sigma = 0.5 * torch.log((1 - alpha_bar) / alpha_bar)
    sigma_max, sigma_min = log_sigma[-1].exp().item(), log_sigma[0].exp().item()
    ramp = torch.tensor(_linspace(1.0, S), dtype=torch.float64)  # i / (N - 1)
    # eq. (5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return _nearest(log_sigma, sigmas.log()).tolist()


def _distinct(ts: list[int], T: int) -> list[int]:
    """S indices in 0..T-1 made distinct with the fewest shifts: a repeat moves up to the next free index (and
    everything is pushed back below T, possible as S <= T). A no-op on a grid without repeats."""
    ts = sorted(min(max(int(t), 0), T - 1) for t in ts)
    for k in range(1, len(ts)):
        ts[k] = max(ts[k], ts[k - 1] + 1)
    for k in reversed(range(len(ts))):
        ts[k] = min(ts[k], T - 1 if k == len(ts) - 1 else ts[k + 1] - 1)
    return ts


def make_timesteps(
    T: int, num_steps: int | None = None, spacing: str = "leading", alpha_bar: torch.Tensor | None = None
) -> torch.Tensor:
    """The S = ``num_steps`` code indices (in 0..T-1) a sampler visits, in visiting (descending) order.

    - ``leading``: 0, k, 2k, ..., (S-1) k with k = T // S (DDIM's "uniform" skip; diffusers' "leading").
    - ``trailing``: round(T - i T/S) - 1 (Lin et al. 2024, "Common diffusion noise schedules and sample
      steps are flawed", Table 2), which always starts at the noisiest step T-1.
    - ``linspace``: round(linspace(0, T-1, S)): both ends, T-1 and 0, are visited.
    - ``quadratic``: DDIM's CIFAR-10 choice (Song et al. 2020, Appendix D.2), floor(linspace(0, sqrt(0.8 T), S)^2),
      dense near t = 0.
    - ``logsnr``: uniform in the half log-SNR lambda_t = log(alpha_t / sigma_t) between t = T-1 and t = 0, each point
      rounded to the nearest code index (DPM-Solver, Lu et al. 2022, Sec. 3.3: "logSNR" steps, recommended there for
      low-resolution images). Needs the schedule: ``alpha_bar`` [T] (float64 for exactness), and a finite lambda at
      T-1: a zero-terminal-SNR schedule (lambda = -inf there) has no such grid; ``trailing`` suits it (Lin et al.).
    - ``karras``: EDM's grid (Karras et al. 2022, eq. 5, rho = 7), dense at low noise: sigma_i spaced uniformly in
      sigma^(1/7) from sigma_max = sigma(T-1) to sigma_min = sigma(0), with the VP model's sigma_t =
      sqrt((1 - alpha_bar_t) / alpha_bar_t), each point rounded to the code index with the nearest log sigma. Needs
      ``alpha_bar``. diffusers' ``use_karras_sigmas`` keeps the exact sigma_i and feeds the network the fractional
      timestep interpolated in log sigma (``_sigma_to_t``); our network takes integer t, so the grid is the nearest
      integer steps and a sampler uses exactly their sigmas (rounding diffusers' fractional timesteps gives the
      same integers, as linear interpolation in log sigma is past the midpoint exactly when the upper index is
      nearer). Like ``logsnr``, it needs a finite sigma at T-1.
    ``num_steps=None`` means S = T (every step). ``quadratic``, ``logsnr`` and ``karras`` can put two points on one
    index near t = 0 (DDIM's own code then visits t = 0 twice); here a repeat moves to the next free index, so every
    grid has S distinct steps and equals the reference wherever the reference has no repeats.
    """
    S = T if num_steps is None else num_steps
    if isinstance(S, float) and S.is_integer():
        S = int(S)
    # A Sampler's configuration is checked where it enters (samplers.sampler.check_sampler_config); here a bad
    # value is a caller's mistake.
    assert spacing in SPACINGS, f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}"
    assert isinstance(S, int) and not isinstance(S, bool) and 1 <= S <= T, f"num_steps={num_steps!r} for T={T}"
    if spacing == "leading":
        ts = [i * (T // S) for i in range(S)]
    elif spacing == "trailing":
        delta = (T + (-T / S)) - T  # numpy.arange(T, 0, -T/S) steps by this (rounded) difference
        ts = [round(T + i * delta) - 1 for i in range(S)]
    elif spacing == "linspace":
        ts = [round(v) for v in _linspace(T - 1, S)]  # round half to even, as numpy.round
    elif spacing == "quadratic":
        ts = [int(v**2) for v in _linspace(math.sqrt(T * 0.8), S)]
    else:
        assert alpha_bar is not None and alpha_bar.numel() == T, f"spacing {spacing!r} needs alpha_bar of length T={T}"
        assert alpha_bar[-1] > 0, f"spacing {spacing!r} needs a finite lambda at T-1 (not zero terminal SNR)"
        grid = _logsnr_grid if spacing == "logsnr" else _karras_grid
        ts = grid(alpha_bar.detach().double().cpu(), S)
    return torch.tensor(_distinct(ts, T)[::-1], dtype=torch.long)
