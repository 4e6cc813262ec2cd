"""EDM's Euler and Heun samplers (Karras et al. 2022, Algorithms 1 and 2) on the VP model: their orders of accuracy
on the exact probability flow of Gaussian data, the churn, and the evaluations they count."""

import pytest
import torch

from ddpmlab.diffusion import Denoiser, make_timesteps
from ddpmlab.samplers import Sampler, ddim_sample, euler_sample, heun_sample_progressive
from sampler_helpers import SD, M, Recorder, TinyNet, gen, linear, x_T


def rms_error(oracle, algorithm, S, spacing="karras"):
    d, net, den, x = oracle
    x = x.double()  # float64: the orders show down to small errors
    grid = make_timesteps(1000, S, spacing, alpha_bar=net.alpha_bar)
    out = Sampler(algorithm, S, spacing, clip_x0=False)(den, x)
    return (out - net.solver_target(x, int(grid[0]), int(grid[-1]))).pow(2).mean().sqrt().item() / SD


def test_euler_is_first_order_and_heun_second_order_on_the_exact_flow(oracle):
    """Halving the steps divides Euler's error by 2 and Heun's by 4 (measured on the karras grid: 1.98, 1.99 and
    4.52, 4.26)."""
    euler = {S: rms_error(oracle, "euler", S) for S in (20, 40, 80)}
    heun = {S: rms_error(oracle, "heun", S) for S in (20, 40, 80)}
    assert 1.8 < euler[20] / euler[40] < 2.2 and 1.8 < euler[40] / euler[80] < 2.2
    assert 3.7 < heun[20] / heun[40] < 5.0 and 3.7 < heun[40] / heun[80] < 5.0
    assert heun[40] * 5 < euler[40]


def test_euler_on_the_ode_is_ddim():
    """Euler's method in x / sqrt(alpha_bar) against sigma is DDIM (Song et al. 2020, eq. 14; EDM Sec. 3): the same
    x_0 on any grid, without clipping."""
    d = linear(1000)
    den = Denoiser(TinyNet(d), d)
    for spacing in ("karras", "leading", "logsnr"):
        grid = make_timesteps(1000, 13, spacing, alpha_bar=d.alpha_bar64)
        ours = euler_sample(den, x_T(), grid, clip_x0=False)
        assert torch.allclose(ours, ddim_sample(den, x_T(), grid, clip_x0=False), atol=1e-5), spacing


def test_heun_evaluates_each_step_and_the_corrections_at_the_next_step():
    """2S - 1 evaluations, one yield each: t_0, then t_{i+1} twice (the correction, then the next step's own), and
    none after the last step (to sigma = 0)."""
    d = linear(100)
    net = Recorder(TinyNet(d))
    grid = [90, 50, 20, 0]
    steps = list(heun_sample_progressive(Denoiser(net, d), x_T(), grid))
    assert net.seen == [90, 50, 50, 20, 20, 0, 0] == [s.t for s in steps]
    assert Sampler("heun", 4, "leading").num_evaluations(d) == 7 == len(steps)
    assert Sampler("euler", 4, "leading").num_evaluations(d) == 4


def test_heun_with_churn_recovers_the_data_distribution(oracle):
    """With churn (EDM Algorithm 2; gamma = min(S_churn / S, sqrt(2) - 1) = sqrt(2) - 1 at every step here) Heun is
    stochastic and still draws from the data: mean M, std SD of 16,000 values (sampling errors ~0.0024 and ~0.6%;
    measured std 0.3038). The churn's own discretisation error shrinks with the steps: at 18 steps the std is 15% high
    (0.347), at 50 5% (0.314). (Euler with churn is first order in that error too, low by 13% at 50 steps: EDM pairs
    the churn with Heun.)"""
    d, _, den, x = oracle
    sampler = Sampler("heun", 100, "karras", S_churn=80.0, clip_x0=False)
    x0 = sampler(den, x, generator=gen(1))
    assert x0.mean().item() == pytest.approx(M, abs=0.012)
    assert x0.std().item() == pytest.approx(SD, rel=0.025)
    assert not torch.allclose(x0, sampler(den, x, generator=gen(2)))  # the churn draws noise
    ode = Sampler("heun", 100, "karras", clip_x0=False)
    assert torch.equal(ode(den, x, generator=gen(1)), ode(den, x, generator=gen(2)))  # S_churn = 0: deterministic


def test_churn_evaluates_the_network_at_the_nearest_integer_step_of_sigma_hat():
    """sigma_hat = (1 + gamma) sigma_i moves to the code index with the nearest log sigma; the network sees that
    index, and only where S_tmin <= sigma_i <= S_tmax."""
    d = linear(1000)
    log_sigma = 0.5 * torch.log((1 - d.alpha_bar64) / d.alpha_bar64)
    grid = make_timesteps(1000, 10, "karras", alpha_bar=d.alpha_bar64).tolist()
    gamma = 2**0.5 - 1  # S_churn / N = 2 > sqrt(2) - 1
    net = Recorder(TinyNet(d))
    s_tmin, s_tmax = 0.5, 20.0
    steps = list(
        Sampler("euler", 10, "karras", S_churn=20.0, S_tmin=s_tmin, S_tmax=s_tmax).steps(
            Denoiser(net, d), x_T(), generator=gen()
        )
    )
    expected = []
    for t in grid:
        sigma = log_sigma[t].exp().item()
        if s_tmin <= sigma <= s_tmax:
            t = int((log_sigma - torch.log(torch.tensor(sigma * (1 + gamma), dtype=torch.float64))).abs().argmin())
        expected.append(t)
    assert net.seen == expected == [s.t for s in steps]
    assert expected != grid and expected[0] == grid[0] and expected[-1] == grid[-1]  # sigma(T-1) > 20, sigma(0) < 0.5
