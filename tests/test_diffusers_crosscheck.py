"""Cross-checks against an independent implementation: diffusers' schedulers (a test-only dependency), wherever
they follow the papers. Random inputs; agreement to 1e-5.

Where diffusers does not follow the paper, we do not compare: its DDIMScheduler computes the previous timestep as
t - T // S inside ``step``, which is the next grid entry only on the leading grid and on the trailing grid when S
divides T (and its trailing grid itself gains a spurious t = -1 for some (T, S), e.g. T = 50, S = 29)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from ddpmlab.diffusion import Denoiser, make_timesteps  # noqa: E402
from ddpmlab.diffusion.parameterization import Prediction  # noqa: E402
from ddpmlab.samplers import Sampler, ddim_step, ddpm_step  # noqa: E402
from sampler_helpers import TinyNet  # noqa: E402

T = 1000
LINEAR = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def in_float64(scheduler):
    """diffusers keeps its tables in float32, whose rounding alone exceeds 1e-5 (1 - alpha_bar_t / alpha_bar_{t-1} at
    small t loses 3 digits); recompute them in float64 from diffusers' own definition of the linear schedule, so the
    comparison is between the algorithms. The steps themselves run unchanged."""
    scheduler.betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
    return scheduler


def test_the_schedules_agree(diffusion):
    for scheduler in (DDPMScheduler(**LINEAR), DDIMScheduler(**LINEAR), DPMSolverMultistepScheduler(**LINEAR)):
        assert torch.allclose(scheduler.alphas_cumprod, diffusion.alpha_bar, rtol=1e-5, atol=1e-9)
        assert torch.allclose(scheduler.betas, diffusion.beta, rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_the_grids_agree_with_ddim_schedulers(spacing):
    compared = 0
    for S in range(1, 201):
        scheduler = DDIMScheduler(**LINEAR, timestep_spacing=spacing, steps_offset=0)
        scheduler.set_timesteps(S)
        theirs = scheduler.timesteps.tolist()
        if len(theirs) != S:  # diffusers' trailing grid with a spurious -1 (see the module docstring)
            assert spacing == "trailing" and theirs[-1] == -1
            continue
        assert make_timesteps(T, S, spacing).tolist() == theirs, S
        compared += 1
    assert compared >= 190


# ------------------------------------------------------------------------------------------------ single steps
@pytest.mark.parametrize("variance,variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
def test_one_ddpm_step_matches_ddpm_scheduler(diffusion, variance, variance_type):
    """Random x_t, random network output, random t: DDPM's Algorithm 2 step, no clipping, same noise."""
    scheduler = in_float64(DDPMScheduler(**LINEAR, variance_type=variance_type, clip_sample=False))
    scheduler.set_timesteps(T)
    g = gen(0)
    for t in [999, 998, 700, 487, 100, 10, 1, 0]:
        x_t = torch.randn(4, 3, 8, 8, generator=g)
        eps_hat = torch.randn(4, 3, 8, 8, generator=g)
        theirs = scheduler.step(eps_hat, t, x_t, generator=gen(t)).prev_sample
        tb = torch.full((4,), t)
        pred = Prediction(eps_hat, diffusion.x0_from_eps(x_t, tb, eps_hat))
        noise = torch.randn(x_t.shape, generator=gen(t)) if t > 0 else None
        ours = ddpm_step(pred, diffusion, x_t, tb, noise, variance)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (t, (ours - theirs).abs().max())


@pytest.mark.parametrize("S", [10, 50, 7, 333, 1000])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_one_ddim_step_matches_ddim_scheduler_on_the_leading_grid(diffusion, S, eta):
    scheduler = in_float64(
        DDIMScheduler(**LINEAR, timestep_spacing="leading", steps_offset=0, clip_sample=False, set_alpha_to_one=True)
    )
    scheduler.set_timesteps(S)
    grid = make_timesteps(T, S, "leading")
    alpha_bar = torch.cumprod(1 - diffusion.beta64, 0)
    g = gen(S)
    for i in sorted({0, 1, S // 2, S - 2, S - 1} & set(range(S))):
        t = int(grid[i])
        x_t, eps_hat, noise = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
        theirs = scheduler.step(eps_hat, t, x_t, eta=eta, variance_noise=noise).prev_sample
        a_t = alpha_bar[t]
        a_prev = (
            alpha_bar[int(grid[i + 1])] if i + 1 < S else torch.tensor(1.0, dtype=torch.float64)
        )  # the next grid entry
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        pred = Prediction(eps_hat, diffusion.x0_from_eps(x_t, torch.full((4,), t), eps_hat))
        ours = ddim_step(pred, a_prev, sigma, noise if eta > 0 else None)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (t, (ours - theirs).abs().max())


# ------------------------------------------------------------------------------------------------ whole loops
def run_diffusers(scheduler, net, x, generator=None, **step_kwargs):
    for t in scheduler.timesteps:
        eps_hat = net(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(eps_hat, t, x, generator=generator, **step_kwargs).prev_sample
    return x


GRIDS = [("leading", 50), ("trailing", 37), ("linspace", 20), ("quadratic", 30), ("logsnr", 25)]


@pytest.mark.parametrize(
    "spacing,S,variance,variance_type",
    [(*grid, "small", "fixed_small") for grid in GRIDS + [("leading", T)]]
    + [(*grid, "large", "fixed_large") for grid in GRIDS if grid[0] != "trailing"],
)
def test_ddpm_sampling_matches_ddpm_scheduler_on_any_grid(diffusion, spacing, S, variance, variance_type):
    """DDPMScheduler takes the next grid entry as the previous timestep and rebuilds beta from alpha_bar, i.e. it
    samples the respaced process on any grid; with the same noise the two agree. (Except one thing: it adds noise at
    the last step whenever that step's t > 0, as on a trailing grid; with beta_tilde that noise has variance 0, with
    beta it does not, and Algorithm 2's last step is noise-free: on the trailing grid we compare "small" only.)"""
    net = TinyNet(diffusion, dim=8)
    grid = make_timesteps(T, S, spacing, alpha_bar=torch.cumprod(1 - diffusion.beta64, 0))
    scheduler = in_float64(DDPMScheduler(**LINEAR, variance_type=variance_type, clip_sample=False))
    scheduler.set_timesteps(timesteps=grid.tolist())
    x_T = torch.randn(3, 1, 8, 8, generator=gen(1))
    theirs = run_diffusers(scheduler, net, x_T, generator=gen(2))
    ours = Sampler("ddpm", S, spacing, variance=variance, clip_x0=False)(
        Denoiser(net, diffusion), x_T, generator=gen(2)
    )
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize(
    "spacing,S,eta,clip",
    [
        (*grid, *options)
        for grid in [("leading", 50), ("leading", 7), ("trailing", 50), ("trailing", 8)]
        for options in [(0.0, False), (1.0, False), (0.0, True)]
    ]
    + [("leading", T, 1.0, False)],
)
def test_ddim_sampling_matches_ddim_scheduler_where_it_follows_the_paper(diffusion, spacing, S, eta, clip):
    """Clipping in DDIMScheduler with use_clipped_model_output=True is ours: x0_hat clipped, eps re-derived."""
    assert T % S == 0 or spacing == "leading"
    net = TinyNet(diffusion, dim=8)
    scheduler = in_float64(
        DDIMScheduler(**LINEAR, timestep_spacing=spacing, steps_offset=0, clip_sample=clip, set_alpha_to_one=True)
    )
    scheduler.set_timesteps(S)
    x_T = torch.randn(3, 1, 8, 8, generator=gen(1))
    theirs = run_diffusers(scheduler, net, x_T, generator=gen(2), eta=eta, use_clipped_model_output=clip)
    ours = Sampler("ddim", S, spacing, eta=eta, clip_x0=clip)(Denoiser(net, diffusion), x_T, generator=gen(2))
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize(
    "spacing,S", [("logsnr", 20), ("logsnr", 10), ("quadratic", 15), ("linspace", 25), ("trailing", 12)]
)
def test_dpm_solver_matches_dpm_solver_multistep_scheduler(diffusion, spacing, S):
    """diffusers' DPM-Solver++ (algorithm_type="dpmsolver++", solver_order=2, midpoint), on our grid, ending at
    sigma = 0 with a first-order step (final_sigmas_type="zero"), as Algorithm 2 with our last step."""
    net = TinyNet(diffusion, dim=8)
    grid = make_timesteps(T, S, spacing, alpha_bar=torch.cumprod(1 - diffusion.beta64, 0))
    scheduler = DPMSolverMultistepScheduler(
        **LINEAR,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    scheduler.set_timesteps(timesteps=grid.tolist())
    # Its sigmas (sqrt((1 - alpha_bar) / alpha_bar) at the grid, then 0) are float32; the same values in float64:
    alpha_bar = in_float64(scheduler).alphas_cumprod[scheduler.timesteps]
    scheduler.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x_T = torch.randn(3, 1, 8, 8, generator=gen(1))
    theirs = run_diffusers(scheduler, net, x_T)
    ours = Sampler("dpm_solver", S, spacing, clip_x0=False)(Denoiser(net, diffusion), x_T)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
