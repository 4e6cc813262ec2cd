"""Zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"): the rescaled
schedules, what they refuse, and sampling from them: alpha_bar_T = 0, so x_T ~ N(0, I) is exactly q(x_T)."""

import pytest
import torch

from conftest import TINY, compose_cfg
from ddpmlab.diffusion import Denoiser, GaussianDiffusion, validate_betas
from ddpmlab.diffusion.parameterization import Prediction, shift_score
from ddpmlab.diffusion.schedules import cosine_betas, linear_betas, quadratic_betas, sigmoid_betas
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.nll import bits_per_dim
from ddpmlab.samplers import ALGORITHMS, Sampler
from ddpmlab.validate import check_train_config
from sampler_helpers import SD, M, x_T

SCHEDULES = [linear_betas, cosine_betas, quadratic_betas, sigmoid_betas]


def zsnr(T: int = 1000, schedule=linear_betas) -> GaussianDiffusion:
    return GaussianDiffusion(schedule(T, zero_terminal_snr=True))


# ---------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("T", [1000, 50])
def test_rescaled_schedule_has_zero_terminal_snr_and_keeps_alpha_bar_1(schedule, T):
    old, new = (torch.cumprod(1 - schedule(T, zero_terminal_snr=z), 0) for z in (False, True))
    assert new.dtype == torch.float64 and old[-1] > 0
    assert new[-1] == 0 and schedule(T, zero_terminal_snr=True)[-1] == 1  # exactly: beta_T = 1
    assert abs(new[0] - old[0]) < 4 * torch.finfo(torch.float64).eps
    snr = new / (1 - new)
    assert (snr[1:] < snr[:-1]).all()  # strictly decreasing, down to 0
    # Algorithm 1 moves sqrt(alpha_bar) by one affine map: every difference is scaled by the same factor
    ratio = new.sqrt().diff() / old.sqrt().diff()
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-9, atol=0)
    assert ratio[0] > 1


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda f: f.__name__)
def test_rescale_agrees_with_diffusers(schedule):
    ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    torch.testing.assert_close(
        schedule(1000, zero_terminal_snr=True), ddim.rescale_zero_terminal_snr(schedule(1000)), rtol=1e-12, atol=1e-15
    )


def test_beta_of_one_is_accepted_only_as_the_last_of_a_zero_terminal_snr_schedule():
    betas = linear_betas(50, zero_terminal_snr=True)
    with pytest.raises(ConfigError, match=r"every beta must lie in \(0, 1\), but beta\[49\] = 1"):
        validate_betas(betas)
    validate_betas(betas, zero_terminal_snr=True)
    for i, bad in ((10, 1.0), (49, 1.5), (49, 0.0)):
        wrong = betas.clone()
        wrong[i] = bad
        with pytest.raises(ConfigError, match=rf"\(the last may be 1\), but beta\[{i}\]"):
            GaussianDiffusion(wrong)


def test_tables_at_snr_zero():
    d = zsnr(50)
    assert d.alpha_bar[-1] == 0 and d.snr[-1] == 0 and d.beta_tilde[-1] == 1 - d.alpha_bar[-2]
    for name, table in d.named_buffers():
        if name not in ("sqrt_recip_alpha_bar", "sqrt_recipm1_alpha_bar"):  # 1 / sqrt(alpha_bar_T): inf by definition
            assert torch.isfinite(table).all(), name
    x_t, x0 = torch.randn(2, 3, 1, 4, 4).unbind()
    t = torch.full((3,), 49)
    assert torch.equal(d.eps_from_x0(x_t, t, x0), x_t)  # x_T is the noise itself
    assert torch.equal(d.x0_from_v(x_t, t, x0), -x0)  # v = -x0 there


# ---------------------------------------------------------------------------------------------- refusals
def test_eps_prediction_is_refused_in_one_line_naming_the_fix(tmp_path):
    cfg = compose_cfg("train", TINY + ["schedule.zero_terminal_snr=true"], tmp_path)
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    line = str(e.value)
    assert "\n" not in line and "schedule.zero_terminal_snr=true" in line and "set prediction=v" in line
    with pytest.raises(ConfigError, match="set prediction=v"):  # a stored config that went round the check
        Denoiser(torch.nn.Identity(), zsnr(50), "eps")
    for prediction in ("v", "x0"):
        check_train_config(compose_cfg("train", TINY + ["schedule.zero_terminal_snr=true", f"prediction={prediction}"]))


def test_logsnr_grid_is_refused_and_trailing_starts_at_T_minus_1(tmp_path):
    zero = ["schedule.zero_terminal_snr=true", "prediction=v", "sampler=dpm_solver"]
    with pytest.raises(ConfigError, match="use sampler.spacing=trailing"):
        check_train_config(compose_cfg("train", TINY + zero, tmp_path))
    check_train_config(compose_cfg("train", TINY + zero + ["sampler.spacing=trailing"], tmp_path))
    with pytest.raises(ConfigError, match="lambda = -inf"):
        Sampler("dpm_solver", 10, "logsnr").timesteps(zsnr(50))
    assert Sampler("ddim", 10, "trailing").timesteps(zsnr(50))[0] == 49
    assert Sampler("ddim", 10, "leading").timesteps(zsnr(50))[0] == 45  # allowed: it starts below T-1
    with pytest.raises(ConfigError, match="sampler.spacing=karras .* sigma = inf; use sampler.spacing=trailing"):
        Sampler("unipc", 10, "karras").timesteps(zsnr(50))
    with pytest.raises(ConfigError, match="sampler heun integrates in sigma"):
        check_train_config(compose_cfg("train", TINY + zero[:2] + ["sampler=heun", "sampler.spacing=trailing"]))


# ---------------------------------------------------------------------------------------------- sampling
class GaussianVOracle(torch.nn.Module):
    """The optimal v-predictor for data x0 ~ N(m, s^2 I): v = sqrt(a) E[eps | x_t] - sqrt(1 - a) E[x0 | x_t], with
    x_t ~ N(sqrt(a) m, a s^2 + 1 - a) (a = alpha_bar_t); at a = 0 it is -m."""

    def __init__(self, diffusion, m, s):
        super().__init__()
        self.alpha_bar, self.m, self.s = diffusion.alpha_bar64, m, s

    def forward(self, x, t):
        a = self.alpha_bar[t].view(-1, *[1] * (x.dim() - 1))
        r = (x - a.sqrt() * self.m) / (a * self.s**2 + 1 - a)
        eps, x0 = (1 - a).sqrt() * r, self.m + a.sqrt() * self.s**2 * r
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x.dtype)


# 3M takes 100 steps: at 50 trailing steps it is 2.4% low in std on the original linear schedule too (the grid's doing)
@pytest.mark.parametrize(
    "algorithm,num_steps,options",
    [
        ("ddim", 250, {}),
        ("dpm_solver", 50, {}),
        ("dpm_solver", 100, {"order": 3}),
        ("unipc", 50, {"order": 2}),
        ("unipc", 50, {"order": 3}),
    ],
)
def test_v_oracle_on_the_trailing_grid_recovers_the_data(algorithm, num_steps, options):
    """16,000 values: the sampling error of the mean is ~0.0024, of the std ~0.6%; the trailing grid, uniform in t,
    is coarse near t = 0, where most of the discretisation error is made (~1% here; 8% with DDIM's 50 steps, on
    the original schedule alike)."""
    d = zsnr(1000)
    denoiser = Denoiser(GaussianVOracle(d, M, SD), d, "v")
    sampler = Sampler(algorithm, num_steps, "trailing", clip_x0=False, **options)
    x0 = sampler(denoiser, x_T(4000, seed=3, shape=(1, 2, 2)))
    assert x0.mean().item() == pytest.approx(M, abs=0.01)
    assert x0.std().item() == pytest.approx(SD, rel=0.02)


def test_ddim_from_pure_noise_follows_the_exact_probability_flow():
    """At alpha_bar_T = 0, q(x_T) = N(0, I) exactly and the flow of N(m, s^2) data maps x_T to m + s x_T."""
    d = zsnr(1000)
    x = x_T(500, seed=3, shape=(1, 2, 2))
    x0 = Sampler("ddim", None, "trailing", clip_x0=False)(Denoiser(GaussianVOracle(d, M, SD), d, "v"), x)
    assert (x0 - (M + SD * x)).abs().max() < 0.01


def test_dpm_solvers_first_step_from_pure_noise_is_ddims():
    d = zsnr(1000)
    denoiser = Denoiser(GaussianVOracle(d, M, SD), d, "v")
    first = [next(Sampler(a, 10, "trailing").steps(denoiser, x_T())).x for a in ("dpm_solver", "ddim")]
    assert torch.isfinite(first[0]).all()
    torch.testing.assert_close(first[0], first[1], atol=1e-6, rtol=1e-6)


def test_classifier_gradient_is_dropped_where_x_t_holds_no_signal():
    d = zsnr(50)
    x_t, x0 = torch.randn(2, 2, 1, 4, 4).unbind()
    t = torch.tensor([49, 20])
    pred = Prediction(x_t, x0, guide_grad=torch.ones_like(x_t))
    out = shift_score(pred, d, x_t, t)
    assert torch.isfinite(out.x0_hat).all() and out.guide_grad is None
    assert torch.equal(out.x0_hat[0], x0[0]) and not torch.equal(out.eps_hat[1], x_t[1])


@pytest.fixture(scope="module")
def zero_snr_run(tmp_path_factory):
    """A tiny v-prediction run on the zero-terminal-SNR linear schedule (T = 50), its grids on the trailing grid."""
    from ddpmlab.training import train

    run = tmp_path_factory.mktemp("zsnr_run")
    overrides = ["schedule.zero_terminal_snr=true", "prediction=v", "sampler=ddim", "sampler.spacing=trailing"]
    train(compose_cfg("train", TINY + overrides, run))
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_trained_v_model_samples_finite_images_from_pure_noise(zero_snr_run, algorithm):
    import ddpmlab

    denoiser, cfg = ddpmlab.load(zero_snr_run)
    assert cfg.schedule.zero_terminal_snr and denoiser.diffusion.alpha_bar[-1] == 0
    sampler = Sampler(algorithm, 5, "trailing")
    if algorithm in ("euler", "heun"):  # EDM's samplers work in sigma, infinite at T-1: refused with the reason
        with pytest.raises(ConfigError, match=rf"sampler {algorithm} integrates in sigma .* infinite at T-1"):
            sampler.timesteps(denoiser.diffusion)
        assert Sampler(algorithm, 5, "leading").timesteps(denoiser.diffusion)[0] < 49  # a grid that stops short runs
        return
    assert sampler.timesteps(denoiser.diffusion)[0] == 49
    x0 = sampler(denoiser, torch.randn(4, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(x0).all() and x0.abs().max() <= 1.5


def test_bits_per_dim_is_finite_at_snr_zero(zero_snr_run):
    import ddpmlab

    denoiser, _ = ddpmlab.load(zero_snr_run)
    x0 = torch.rand(2, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bpd = bits_per_dim(denoiser, x0, stride=7, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(bpd.total).all() and (bpd.prior == 0).all()  # q(x_T | x_0) = N(0, I) exactly


def test_repaint_completes_from_pure_noise(zero_snr_run):
    import ddpmlab

    denoiser, _ = ddpmlab.load(zero_snr_run)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, *denoiser.sample_shape, generator=g) * 2 - 1
    keep = torch.zeros(denoiser.sample_shape[1:])
    keep[:, :4] = 1
    sampler = Sampler("repaint", 6, "trailing", jump_length=5, jump_n_sample=2)  # jumps back to T-1: beta = 1
    out = sampler(denoiser, torch.randn(2, *denoiser.sample_shape, generator=g), generator=g, x0=x0, keep=keep)
    assert torch.isfinite(out).all() and torch.equal(out[..., :4], x0.expand_as(out)[..., :4])


def test_a_checkpoint_written_before_the_key_resumes_and_a_changed_one_is_refused():
    from ddpmlab.errors import CheckpointError
    from ddpmlab.lit.module import check_compatible

    stored = {"_target_": "ddpmlab.diffusion.schedules.linear_betas", "num_timesteps": 50}
    check_compatible({"schedule": stored}, {"schedule": {**stored, "zero_terminal_snr": False}})
    with pytest.raises(CheckpointError, match="schedule.zero_terminal_snr: checkpoint False, this run True"):
        check_compatible({"schedule": stored}, {"schedule": {**stored, "zero_terminal_snr": True}})
