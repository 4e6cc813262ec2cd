"""Cross-checks against an independent implementation: diffusers' schedulers (a test-only dependency), wherever
they follow the papers. Random inputs; agreement to 1e-5.

Where diffusers does not follow the paper, we do not compare: its DDIMScheduler computes the previous timestep as
t - T // S inside ``step``, which is the next grid entry only on the leading grid and on the trailing grid when S
divides T (and its trailing grid itself gains a spurious t = -1 for some (T, S), e.g. T = 50, S = 29). Its
EulerDiscreteScheduler's churn (s_churn) evaluates the network before the churn noise is added, not at x_hat as EDM's
Algorithm 2 does, and HeunDiscreteScheduler has no churn: EDM's stochastic samplers are checked on the Gaussian
oracle instead (test_samplers_edm.py). Its DPM-Solver++(3M) weights the second-derivative term by half its exact
coefficient: we compare with that term measured and restored."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ddpmlab.diffusion import Denoiser, make_timesteps  # noqa: E402
from ddpmlab.diffusion.parameterization import Prediction  # noqa: E402
from ddpmlab.samplers import Sampler, ddim_step, ddpm_step  # noqa: E402
from ddpmlab.samplers.dpm_solver import dpm_solver_pp_3m_update  # noqa: E402
from sampler_helpers import SD, GaussianOracle, M, TinyNet  # noqa: E402

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


def test_the_karras_grid_rounds_diffusers_karras_timesteps():
    """diffusers' use_karras_sigmas keeps the exact sigma_i of EDM eq. (5) and interpolates a fractional timestep in
    log sigma; the nearest integer step in log sigma is that timestep rounded. Compared where diffusers' float32
    interpolation is not within 0.02 of a tie and its rounded grid has no repeats (ours moves a repeat)."""
    compared = 0
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    for S in range(2, 121):
        scheduler = EulerDiscreteScheduler(**LINEAR, use_karras_sigmas=True, timestep_spacing="linspace")
        scheduler.set_timesteps(S)
        theirs = scheduler.timesteps.double()
        rounded = theirs.round().long()
        if len(set(rounded.tolist())) < S:
            continue
        clear = ((theirs - theirs.floor()) - 0.5).abs() > 0.02
        ours = make_timesteps(T, S, "karras", alpha_bar=alpha_bar)
        assert ours[clear].tolist() == rounded[clear].tolist(), S
        compared += int(clear.sum())
    assert compared > 2500  # of 3,000-odd grid points


def ve_sigmas(alpha_bar, grid):
    """sqrt((1 - alpha_bar) / alpha_bar) at the grid, then 0: the sigmas diffusers' schedulers keep in float32."""
    a = alpha_bar[grid]
    return torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)])


def run_diffusers_ve(scheduler, net, x_T):
    """The loop of diffusers' Euler and Heun pipelines: the sample is x / sqrt(alpha_bar) (it starts at x_T times
    sqrt(1 + sigma_0^2)) and scale_model_input gives the network x again. Every state, back in our VP scale."""
    sigma = scheduler.sigmas
    x = (x_T.double() * (1 + sigma[0] ** 2).sqrt()).float()
    states = []
    for i, t in enumerate(scheduler.timesteps):
        eps_hat = net(scheduler.scale_model_input(x, t), torch.full((x.shape[0],), int(t)))
        x = scheduler.step(eps_hat, t, x).prev_sample
        states.append(x / (1 + sigma[i + 1] ** 2).sqrt())  # sigma after step i (Heun: its repeated sigmas)
    return states


@pytest.mark.parametrize(
    "algorithm,scheduler_class,clip",
    [
        ("euler", EulerDiscreteScheduler, False),
        ("heun", HeunDiscreteScheduler, False),
        ("heun", HeunDiscreteScheduler, True),
    ],
)
@pytest.mark.parametrize("spacing,S", [("karras", 12), ("logsnr", 20), ("linspace", 7), ("trailing", 30)])
def test_euler_and_heun_match_diffusers_step_by_step(diffusion, algorithm, scheduler_class, clip, spacing, S):
    """Every step, from the first to x_0: our yields (one per network evaluation, Heun's Euler step and correction
    each) against diffusers' steps (HeunDiscreteScheduler takes one call per evaluation too), our grid passed as
    its timesteps, its float32 sigmas replaced by the same values in float64. Clipping: diffusers' Heun clips its
    x0 prediction (clip_sample) as our clip_x0 clips D; Euler has no clipping, so only unclipped."""
    net = TinyNet(diffusion, dim=8)
    alpha_bar = diffusion.alpha_bar64
    grid = make_timesteps(T, S, spacing, alpha_bar=alpha_bar)
    scheduler = scheduler_class(**LINEAR, **({"clip_sample": clip} if algorithm == "heun" else {}))
    scheduler.set_timesteps(timesteps=grid.tolist())
    sigmas = ve_sigmas(alpha_bar, grid)
    scheduler.sigmas = (
        sigmas if algorithm == "euler" else torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    )
    x_T = torch.randn(3, 1, 8, 8, generator=gen(1))
    theirs = run_diffusers_ve(scheduler, net, x_T)
    sampler = Sampler(algorithm, S, spacing, clip_x0=clip)
    ours = [step.x for step in sampler.steps(Denoiser(net, diffusion), x_T)]
    assert len(ours) == len(theirs) == sampler.num_evaluations(diffusion) == (2 * S - 1 if algorithm == "heun" else S)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (i, (a - b).abs().max())


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(
    "spacing,S", [("logsnr", 20), ("logsnr", 10), ("karras", 8), ("quadratic", 15), ("linspace", 6)]
)
def test_unipc_matches_unipc_multistep_scheduler_step_by_step(diffusion, order, spacing, S):
    """UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
    on our grid (it takes no custom timesteps: its grid and sigmas are replaced, the sigmas in float64), every
    step's predicted sample (the corrector refines it with the next evaluation, in both)."""
    net = TinyNet(diffusion, dim=8)
    grid = make_timesteps(T, S, spacing, alpha_bar=diffusion.alpha_bar64)
    scheduler = UniPCMultistepScheduler(
        **LINEAR, solver_order=order, predict_x0=True, solver_type="bh2", lower_order_final=True,
        final_sigmas_type="zero",
    )  # fmt: skip
    scheduler.set_timesteps(S)
    scheduler.timesteps, scheduler.sigmas = grid.clone(), ve_sigmas(diffusion.alpha_bar64, grid)
    x, theirs = torch.randn(3, 1, 8, 8, generator=gen(1)), []
    x_T = x
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, torch.full((3,), int(t))), t, x).prev_sample
        theirs.append(x)
    ours = [
        step.x for step in Sampler("unipc", S, spacing, order=order, clip_x0=False).steps(Denoiser(net, diffusion), x_T)
    ]
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (i, (a - b).abs().max())


def _dpm_3m(**kwargs):
    return DPMSolverMultistepScheduler(
        **LINEAR, algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="zero", lower_order_final=True,
        **kwargs,
    )  # fmt: skip


def _missing_half(m, lams, lam_t, alpha_t):
    """The half of DPM-Solver++(3M)'s second-derivative term that diffusers leaves out: alpha_t phi_3(h) D2 / 2,
    phi_3(h) = int_0^h e^{u-h} u^2 du / h^2 (the exact weight of D2 = h^2 x0_hat''/2)."""
    h, h_0, h_1 = lam_t - lams[0], lams[0] - lams[1], lams[1] - lams[2]
    r0, r1 = h_0 / h, h_1 / h
    D2 = ((m[0] - m[1]) / r0 - (m[1] - m[2]) / r1) / (r0 + r1)
    phi_3 = (h * h - 2 * h + 2 * -torch.expm1(-h)) / (h * h)
    return alpha_t * phi_3 * D2 / 2


def test_one_dpm_solver_3m_step_is_diffusers_step_plus_the_half_it_leaves_out():
    """Random data predictions at three points, random x, one third-order step: ours minus diffusers' is exactly
    alpha_t phi_3 D2 / 2 (and not 0: the term is of order one here)."""
    scheduler = _dpm_3m()
    sigmas = torch.tensor([3.0, 1.5, 0.8, 0.3], dtype=torch.float64)  # VE sigmas of s2, s1, s0, t
    scheduler.sigmas, scheduler._step_index = sigmas, 2
    alpha, sigma = 1 / (1 + sigmas**2).sqrt(), sigmas / (1 + sigmas**2).sqrt()
    lam = (alpha / sigma).log()
    g = gen(3)
    x, m2, m1, m0 = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    theirs = scheduler.multistep_dpm_solver_third_order_update([m2, m1, m0], sample=x)
    ours = dpm_solver_pp_3m_update(x, (m0, m1, m2), (lam[2].item(), lam[1].item(), lam[0].item()),
                                   lam[3].item(), sigma[2].item(), sigma[3].item(), alpha[3].item())  # fmt: skip
    half = _missing_half([m0, m1, m2], lam[[2, 1, 0]], lam[3], alpha[3])
    assert half.abs().max() > 0.01
    assert torch.allclose(ours, theirs + half, atol=1e-10), (ours - theirs - half).abs().max()


@pytest.mark.parametrize(
    "spacing,S", [("logsnr", 20), ("logsnr", 10), ("karras", 8), ("quadratic", 15), ("linspace", 25)]
)
def test_dpm_solver_3m_matches_diffusers_step_by_step_with_the_half_restored(diffusion, monkeypatch, spacing, S):
    """The whole loop of DPMSolverMultistepScheduler(solver_order=3) on our grid, its third-order update given back
    the half term (above): every step agrees, which checks the order of every step (warm-up, lower_order_final with
    S < 15 and S >= 15, the last step to sigma = 0). Without the half term the loops part (asserted, so the check
    can fail)."""
    net = TinyNet(diffusion, dim=8)
    grid = make_timesteps(T, S, spacing, alpha_bar=diffusion.alpha_bar64)
    x_T = torch.randn(3, 1, 8, 8, generator=gen(1))
    ours = [
        step.x
        for step in Sampler("dpm_solver", S, spacing, order=3, clip_x0=False).steps(Denoiser(net, diffusion), x_T)
    ]

    def diffusers_loop():
        scheduler = _dpm_3m()
        scheduler.set_timesteps(timesteps=grid.tolist())
        scheduler.sigmas = ve_sigmas(diffusion.alpha_bar64, grid)
        x, states = x_T, []
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, torch.full((3,), int(t))), t, x).prev_sample
            states.append(x)
        return states

    unpatched = diffusers_loop()
    original = DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update

    def restored(self, model_output_list, *args, sample=None, **kwargs):
        i = self.step_index
        sig = self.sigmas[[i - 2, i - 1, i, i + 1]].double()
        alpha, sigma = 1 / (1 + sig**2).sqrt(), sig / (1 + sig**2).sqrt()
        lam = (alpha / sigma).log()
        m = [model_output_list[-1], model_output_list[-2], model_output_list[-3]]
        half = _missing_half(m, lam[[2, 1, 0]], lam[3], alpha[3])
        return original(self, model_output_list, *args, sample=sample, **kwargs) + half

    monkeypatch.setattr(DPMSolverMultistepScheduler, "multistep_dpm_solver_third_order_update", restored)
    theirs = diffusers_loop()
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (i, (a - b).abs().max())
    assert (ours[-1] - unpatched[-1]).abs().max() > 1e-3


def test_diffusers_dpm_solver_3m_is_second_order_and_ours_third(diffusion):
    """On the Gaussian oracle's exact probability flow (float64), halving the steps' size divides the error of
    diffusers' 3M by about 4 (second order) and of ours by about 8."""
    net = GaussianOracle(diffusion, M, SD)
    x_T = torch.randn(2000, 1, 2, 2, generator=gen(3), dtype=torch.float64)

    def errors(run):
        out = {}
        for S in (20, 40, 80):
            grid = make_timesteps(T, S, "logsnr", alpha_bar=diffusion.alpha_bar64)
            target = net.solver_target(x_T, int(grid[0]), int(grid[-1]))
            out[S] = (run(grid) - target).pow(2).mean().sqrt().item() / SD
        return out

    def theirs(grid):
        scheduler = _dpm_3m()
        scheduler.set_timesteps(timesteps=grid.tolist())
        scheduler.sigmas = ve_sigmas(diffusion.alpha_bar64, grid)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
        return x.double()

    ours = errors(lambda grid: Sampler("dpm_solver", len(grid), "logsnr", order=3, clip_x0=False)(
        Denoiser(net, diffusion), x_T))  # fmt: skip
    theirs = errors(theirs)
    assert 3.5 < theirs[20] / theirs[40] < 5.5 and 3.5 < theirs[40] / theirs[80] < 5.5
    assert ours[20] / ours[40] > 6 and ours[40] / ours[80] > 6
