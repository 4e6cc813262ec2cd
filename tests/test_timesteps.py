"""Sampling grids (make_timesteps) against the reference code's formulas, and respacing."""

import math

import numpy as np
import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion, cosine_betas, linear_betas, make_timesteps
from ddpmlab.diffusion.timesteps import SPACINGS

# (T, S): S = T, S = 1, S dividing T and S not dividing T.
SIZES = [
    (10, 1),
    (10, 3),
    (10, 10),
    (50, 7),
    (50, 50),
    (1000, 1),
    (1000, 20),
    (1000, 50),
    (1000, 333),
    (1000, 1000),
    (4000, 250),
]


def alpha_bar_of(T: int) -> torch.Tensor:
    return torch.cumprod(1 - cosine_betas(T), 0)  # valid for every T (linear's betas exceed 1 for T < 20)


def grid(T, S, spacing):
    return make_timesteps(T, S, spacing, alpha_bar=alpha_bar_of(T))


def reference(T: int, S: int, spacing: str) -> list[int]:
    """The reference implementations, in numpy as they are written there."""
    if spacing == "leading":  # DDIM "uniform" skip / diffusers "leading" (steps_offset = 0)
        ts = np.arange(0, S) * (T // S)
    elif spacing == "trailing":  # diffusers "trailing" (Lin et al. 2024, Table 2); float arange can give S+1
        ts = (np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1)[:S]  # values (then a -1): keep S
    elif spacing == "linspace":  # diffusers "linspace"
        ts = np.linspace(0, T - 1, S).round().astype(np.int64)
    else:  # DDIM's "quad" skip: seq = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]
        ts = np.array([int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)])
    return sorted(ts.tolist(), reverse=True)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T,S", SIZES)
def test_every_grid_is_S_distinct_descending_indices(T, S, spacing):
    ts = grid(T, S, spacing)
    assert ts.dtype == torch.long and ts.shape == (S,)
    assert ts.min() >= 0 and ts.max() <= T - 1
    assert (ts[1:] < ts[:-1]).all()
    if S == T:
        assert ts.tolist() == list(range(T - 1, -1, -1))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "quadratic"])
def test_grids_equal_the_reference_formulas(spacing):
    """Equal wherever the reference gives S distinct steps; where DDIM's quadratic formula repeats an index near
    t = 0, ours moves the repeat to the next free index instead (S distinct steps, each within S of the reference)."""
    repeats = 0
    for T in (10, 50, 999, 1000, 1001, 4000):
        for S in range(1, min(T, 120) + 1):
            ours, ref = make_timesteps(T, S, spacing).tolist(), reference(T, S, spacing)
            if len(set(ref)) == S:
                assert ours == ref, (T, S)
            else:
                repeats += 1
                assert spacing == "quadratic" and len(set(ours)) == S
                assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < S
    assert repeats == 0 or spacing == "quadratic"


def test_the_grids_of_the_papers():
    assert make_timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert make_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert make_timesteps(1000, 10, "quadratic").tolist() == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert make_timesteps(1000, 50, "quadratic").tolist()[-4:] == [3, 2, 1, 0]  # DDIM's formula: 2, 1, 0, 0
    assert make_timesteps(1000).tolist() == list(range(999, -1, -1))  # num_steps=None: every step


@pytest.mark.parametrize(
    "betas", [linear_betas(1000), cosine_betas(1000), linear_betas(60)], ids=["linear", "cosine", "linear60"]
)
def test_logsnr_grid_is_uniform_in_lambda(betas):
    T = betas.numel()
    alpha_bar = torch.cumprod(1 - betas, 0)
    lam = 0.5 * torch.log(alpha_bar / (1 - alpha_bar))  # DPM-Solver's lambda_t = log(alpha_t / sigma_t)
    for S in range(1, T + 1, 23 if T > 100 else 1):
        ts = make_timesteps(T, S, "logsnr", alpha_bar=alpha_bar)
        assert ts.shape == (S,) and (ts[1:] < ts[:-1]).all() and ts.min() >= 0 and ts.max() <= T - 1
    ts = make_timesteps(T, 10, "logsnr", alpha_bar=alpha_bar)
    assert ts[0] == T - 1 and ts[-1] == 0
    if betas is not None and T == 1000 and betas[-1] < 0.5:  # linear: nearest index to each uniform lambda, no shifts
        targets = torch.linspace(float(lam[-1]), float(lam[0]), 10, dtype=torch.float64)
        nearest = [int((lam - v).abs().argmin()) for v in targets]
        assert ts.tolist() == nearest
        gaps = lam[ts[1:]] - lam[ts[:-1]]
        assert gaps.max() / gaps.min() < 1.6  # nearly uniform in lambda (time-uniform grids: a ratio over 30)


def test_logsnr_needs_the_schedule():
    with pytest.raises(AssertionError, match="alpha_bar"):
        make_timesteps(1000, 10, "logsnr")


@pytest.mark.parametrize(
    "args,match",
    [
        ((10, 11, "leading"), "num_steps=11 for T=10"),
        ((10, 0, "leading"), "num_steps=0 for T=10"),
        ((10, 2.5, "leading"), "num_steps=2.5"),
        ((10, 3, "cosine"), "unknown timestep spacing"),
    ],
)
def test_bad_grids_are_the_callers_mistake(args, match):
    """A sampler's configuration is checked where it enters (Sampler, test_samplers_common); make_timesteps only
    asserts."""
    with pytest.raises(AssertionError, match=match):
        make_timesteps(*args)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_respacing_keeps_alpha_bar_at_the_grid_and_rebuilds_beta(spacing):
    """improved-diffusion's respacing: beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} over the kept steps."""
    d = GaussianDiffusion(linear_betas(1000))
    ts = make_timesteps(1000, 25, spacing, alpha_bar=torch.cumprod(1 - d.beta64, 0))
    r = d.respace(ts)
    kept = ts.flip(0)
    alpha_bar = torch.cumprod(1 - d.beta64, 0)
    assert r.T == 25
    assert torch.allclose(torch.cumprod(1 - r.beta64, 0), alpha_bar[kept], rtol=1e-12)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[kept][:-1]])
    assert torch.allclose(r.beta64, 1 - alpha_bar[kept] / prev, rtol=1e-12)


def test_respacing_the_full_grid_is_the_identity():
    d = GaussianDiffusion(linear_betas(1000))
    r = d.respace(make_timesteps(1000))
    assert torch.allclose(r.beta64, d.beta64, rtol=1e-9)
    for name in ("alpha_bar", "beta_tilde", "log_beta_tilde", "log_beta_large", "mu_tilde_coef_x0", "mu_tilde_coef_xt"):
        assert torch.allclose(getattr(r, name), getattr(d, name), rtol=1e-5, atol=1e-7), name
    assert math.isclose(float(r.alpha_bar[-1]), float(d.alpha_bar[-1]), rel_tol=1e-6)


@pytest.mark.parametrize("S", [2, 10, 18, 40])
def test_karras_grid_takes_the_integer_steps_nearest_to_edm_sigmas(S):
    """EDM eq. (5) with rho = 7 between sigma(T-1) and sigma(0), sigma = sqrt((1 - alpha_bar) / alpha_bar): each
    grid entry is the code index whose log sigma is nearest to sigma_i's (DDPM's linear schedule: no repeats to move
    at these S; the cosine schedule's sigma grows so fast near T-1 that several land on 999 and move)."""
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    log_sigma = 0.5 * torch.log((1 - alpha_bar) / alpha_bar)
    ts = make_timesteps(1000, S, "karras", alpha_bar=alpha_bar)
    smax, smin = log_sigma[-1].exp(), log_sigma[0].exp()
    ramp = torch.linspace(0, 1, S, dtype=torch.float64)
    target = ((smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7).log()
    assert ts[0] == 999 and ts[-1] == 0
    assert ts.tolist() == (log_sigma[:, None] - target[None]).abs().argmin(0).tolist()
    assert (ts[:-1] - ts[1:] > 0).all()
    assert S == 2 or (ts[:-1] - ts[1:])[-1] < (ts[:-1] - ts[1:])[0]  # dense at low noise


def test_karras_needs_the_schedule():
    with pytest.raises(AssertionError, match="alpha_bar"):
        make_timesteps(1000, 10, "karras")
