"""DPM-Solver++(2M): its first step, its order of accuracy on the exact probability flow of Gaussian data."""

import torch

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, cosine_betas, make_timesteps
from ddpmlab.samplers import (
    ALGORITHMS,
    ddim_sample_progressive,
    dpm_solver_sample,
    dpm_solver_sample_progressive,
)
from sampler_helpers import SD, GaussianOracle, M, TinyNet, linear, x_T


def test_dpm_solver_first_step_is_a_ddim_step_and_one_step_returns_x0_hat():
    """DPM-Solver++(1) is DDIM (Lu et al. 2022, Sec. 4); with one step the solver jumps straight to x0_hat."""
    d = linear(1000)
    den = Denoiser(TinyNet(d), d)
    grid = make_timesteps(1000, 10, "linspace")
    first_dpm = next(iter(dpm_solver_sample_progressive(den, x_T(), grid)))
    first_ddim = next(iter(ddim_sample_progressive(den, x_T(), grid)))
    assert torch.allclose(first_dpm.x, first_ddim.x, atol=1e-5)
    one = list(dpm_solver_sample_progressive(den, x_T(), [500]))
    assert len(one) == 1 and torch.allclose(one[0].x, one[0].x0_hat, atol=1e-6)


def test_dpm_solver_follows_the_exact_probability_flow_better_than_ddim(oracle):
    """For Gaussian data the probability-flow ODE has a closed-form solution. DDIM is a first-order solver of it (the
    error halves with the step), DPM-Solver++(2M) second order (the error falls at least fourfold once the steps are
    fine; the final first-order jump to sigma = 0 costs little). The logsnr grid is what makes 2M accurate at 20 steps:
    on the time-uniform linspace grid its extrapolation overshoots (the dpm_solver config's choice)."""
    d, net, den, x = oracle

    def rms_error(algorithm, S, spacing="logsnr"):
        grid = make_timesteps(1000, S, spacing, alpha_bar=net.alpha_bar)
        *_, last = ALGORITHMS[algorithm](den, x, grid, clip_x0=False)
        return (last.x.double() - net.flow_map(x.double(), int(grid[0]))).pow(2).mean().sqrt().item() / SD

    ddim = {S: rms_error("ddim", S) for S in (20, 40)}
    dpm = {S: rms_error("dpm_solver", S) for S in (20, 40, 80)}
    assert 1.7 < ddim[20] / ddim[40] < 2.3  # first order
    assert dpm[40] / dpm[80] > 3.5 and dpm[20] / dpm[40] > 3.5  # second order (or better)
    assert dpm[20] < 0.03 and dpm[20] * 5 < ddim[20]
    assert dpm[20] * 5 < rms_error("dpm_solver", 20, "linspace")


def test_dpm_solver_recovers_the_flow_map_on_a_cosine_schedule_too():
    d = GaussianDiffusion(cosine_betas(1000))
    net = GaussianOracle(d, M, SD)
    x = x_T(1000, seed=4, shape=(1, 2, 2))
    grid = make_timesteps(1000, 20, "quadratic")
    out = dpm_solver_sample(Denoiser(net, d), x, grid, clip_x0=False)
    err = (out.double() - net.flow_map(x.double(), int(grid[0]))).pow(2).mean().sqrt().item() / SD
    assert err < 0.05
