"""DPM-Solver++(2M) and (3M), UniPC: first steps, orders of accuracy on the exact probability flow of Gaussian
data, the evaluations they make."""

import torch

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, cosine_betas, make_timesteps
from ddpmlab.samplers import (
    ALGORITHMS,
    ddim_sample_progressive,
    dpm_solver_sample,
    dpm_solver_sample_progressive,
    unipc_sample_progressive,
)
from sampler_helpers import SD, GaussianOracle, M, Recorder, TinyNet, linear, x_T


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


def solver_error(oracle, algorithm, S, spacing="logsnr", **options):
    """RMS error (in data std) against the exact flow ending with the jump to x0_hat at the grid's last entry, in
    float64 (sampler_helpers.GaussianOracle.solver_target)."""
    d, net, den, x = oracle
    x = x.double()
    grid = make_timesteps(1000, S, spacing, alpha_bar=net.alpha_bar)
    *_, last = ALGORITHMS[algorithm](den, x, grid, clip_x0=False, **options)
    return (last.x - net.solver_target(x, int(grid[0]), int(grid[-1]))).pow(2).mean().sqrt().item() / SD


def test_dpm_solver_3m_is_third_order(oracle):
    """DPM-Solver++(3M): the error falls about eightfold when the steps halve (measured 6.6 and 8.5 from 20 to 40 to
    80 logsnr steps), 2M's about fourfold; past 20 steps 3M is the more accurate. (At 10 steps, h ~ 1 in lambda,
    the expansion is poor and 2M is better on this data: 0.027 against 0.18.)"""
    m3 = {S: solver_error(oracle, "dpm_solver", S, order=3) for S in (20, 40, 80)}
    m2 = {S: solver_error(oracle, "dpm_solver", S, order=2) for S in (20, 40, 80)}
    assert m3[20] / m3[40] > 5.5 and m3[40] / m3[80] > 7
    assert 3.5 < m2[20] / m2[40] < 5 and 3.5 < m2[40] / m2[80] < 5
    assert m3[20] * 5 < m2[20] and m3[80] * 20 < m2[80]


def test_dpm_solver_3m_takes_lower_orders_at_the_ends():
    """Warm-up (orders 1, 2), second order on the step before the last when S < 15 (diffusers' lower_order_final),
    first order on the last: with three steps 3M is 2M, and one step returns x0_hat."""
    d = linear(1000)
    den = Denoiser(TinyNet(d), d)
    for S in (3, 4):
        grid = make_timesteps(1000, S, "logsnr", alpha_bar=d.alpha_bar64)
        two = [s.x for s in dpm_solver_sample_progressive(den, x_T(), grid, order=2)]
        three = [s.x for s in dpm_solver_sample_progressive(den, x_T(), grid, order=3)]
        assert all(torch.equal(a, b) for a, b in zip(two, three, strict=True))
    grid = make_timesteps(1000, 5, "logsnr", alpha_bar=d.alpha_bar64)  # step 2 of 5 is third order
    two = [s.x for s in dpm_solver_sample_progressive(den, x_T(), grid, order=2)]
    three = [s.x for s in dpm_solver_sample_progressive(den, x_T(), grid, order=3)]
    assert torch.equal(two[1], three[1]) and not torch.allclose(two[2], three[2])


def test_unipc_orders_on_the_exact_flow(oracle):
    """UniPC-p with its corrector has order p + 1 (Zhao et al. 2023, Theorem 3.1): UniPC-2's error falls about
    eightfold from 20 to 40 logsnr steps (measured 7.7), UniPC-3's more (measured 55) before the grid's integer
    rounding near t = 0 sets a floor (~6e-5 of the data std). Both beat DPM-Solver++ of the same order there."""
    u2 = {S: solver_error(oracle, "unipc", S, order=2) for S in (10, 20, 40)}
    u3 = {S: solver_error(oracle, "unipc", S, order=3) for S in (20, 40)}
    assert u2[20] / u2[40] > 6 and u2[10] / u2[20] > 4
    assert u3[20] / u3[40] > 16
    assert u2[40] < solver_error(oracle, "dpm_solver", 40, order=2) / 2
    assert u3[40] < solver_error(oracle, "dpm_solver", 40, order=3) / 2


def test_unipc_corrector_reuses_the_next_evaluation():
    """One network evaluation per grid entry (the corrector uses the evaluation at the predicted point, which the
    predictor uses next), none more; the first step is DDIM's and one step returns x0_hat."""
    d = linear(1000)
    net = Recorder(TinyNet(d))
    grid = make_timesteps(1000, 8, "logsnr", alpha_bar=d.alpha_bar64)
    steps = list(unipc_sample_progressive(Denoiser(net, d), x_T(), grid))
    assert net.seen == grid.tolist() == [s.t for s in steps]
    first_ddim = next(iter(ddim_sample_progressive(Denoiser(TinyNet(d), d), x_T(), grid)))
    assert torch.allclose(steps[0].x, first_ddim.x, atol=1e-5)
    one = list(unipc_sample_progressive(Denoiser(TinyNet(d), d), x_T(), [500]))
    assert len(one) == 1 and torch.allclose(one[0].x, one[0].x0_hat, atol=1e-6)
