"""Improved DDPM (Nichol & Dhariwal 2021): learned variances (eq. 15), L_hybrid / L_vlb, importance sampling of t,
AdaGN. Expected values are computed here in float64 from the paper's formulas, independently of the library."""

import math

import pytest
import torch
from torch import nn

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, linear_betas, make_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.networks import UNet
from ddpmlab.networks.layers import ResBlock
from ddpmlab.objectives import HybridLoss, ImportanceSampler, SimpleLoss, UniformSampler, VLBLoss
from ddpmlab.samplers import ddpm_sample, ddpm_sample_progressive
from ddpmlab.training import train

T = 100


@pytest.fixture
def diffusion():
    return GaussianDiffusion(linear_betas(T))


def tables64(beta: torch.Tensor):
    """alpha_bar, beta_tilde (DDPM eq. 7) in float64, and iDDPM's clipped log beta_tilde (t=0 uses beta_tilde_1)."""
    alpha_bar = torch.cumprod(1 - beta, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    log_beta_tilde = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))
    return alpha_bar, alpha_bar_prev, beta_tilde, log_beta_tilde


class FixedOutput(nn.Module):
    """A 'network' whose output is a given tensor (a parameter, so gradients can be inspected)."""

    def __init__(self, out: torch.Tensor, learn_sigma: bool = True):
        super().__init__()
        self.out, self.learn_sigma = nn.Parameter(out.clone()), learn_sigma

    def forward(self, x_t, t, cond=None):
        return self.out


# ---------------------------------------------------------------- learned variance, eq. (15)
@pytest.mark.parametrize("num_steps", [None, 10])
def test_learned_p_mean_variance_matches_the_closed_form_also_after_respacing(diffusion, num_steps):
    g = torch.Generator().manual_seed(0)
    ts = make_timesteps(T, num_steps, "leading")
    process = diffusion.respace(ts)
    # The respaced process's betas from the kept alpha_bar (iDDPM Sec. 4), in float64.
    ab_full = torch.cumprod(1 - linear_betas(T).double(), 0)
    kept = ab_full[ts.flip(0)]
    beta = 1 - kept / torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    alpha_bar, alpha_bar_prev, _, log_beta_tilde = tables64(beta)
    S = len(ts)
    j = torch.arange(S)
    x_t, x0_hat = torch.randn(S, 1, 2, 2, generator=g), torch.randn(S, 1, 2, 2, generator=g)
    v = torch.rand(S, 1, 2, 2, generator=g)
    p = process.p_mean_variance(x0_hat, x_t, j, "learned", var_interp=v)
    expected_log_var = v.double() * beta.log().view(-1, 1, 1, 1) + (1 - v.double()) * log_beta_tilde.view(-1, 1, 1, 1)
    torch.testing.assert_close(p.log_variance.double(), expected_log_var, rtol=1e-5, atol=1e-5)
    # DDPM eq. (7): mu_tilde = sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab) x_t
    c_x0 = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)).view(-1, 1, 1, 1)
    c_xt = ((1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)).view(-1, 1, 1, 1)
    torch.testing.assert_close(p.mean.double(), c_x0 * x0_hat.double() + c_xt * x_t.double(), rtol=1e-5, atol=1e-5)
    # v = 0 and v = 1 are the fixed variances of the same process.
    small = process.p_mean_variance(x0_hat, x_t, j, "learned", var_interp=torch.zeros_like(v))
    fixed = process.p_mean_variance(x0_hat, x_t, j, "small").log_variance
    torch.testing.assert_close(small.log_variance, fixed.expand_as(v))


def test_denoiser_splits_the_variance_channels_and_ancestral_sampling_uses_the_respaced_bounds(diffusion):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(4, 1, 2, 2, generator=g)
    r = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1  # raw variance output in [-1, 1]
    eps_out = torch.randn(4, 1, 2, 2, generator=g)
    den = Denoiser(FixedOutput(torch.cat([eps_out, r], 1)), diffusion)
    ts = make_timesteps(T, 5, "leading")  # [80, 60, 40, 20, 0]
    pred = den(x_T, torch.full((4,), int(ts[0])))
    torch.testing.assert_close(pred.eps_hat, eps_out)
    torch.testing.assert_close(pred.var_interp, (r + 1) / 2)
    # One ancestral step on a 5-step grid, by hand: mean from x0_hat, variance between the respaced bounds.
    g7 = torch.Generator().manual_seed(7)
    step = next(ddpm_sample_progressive(den, x_T, ts, generator=g7, clip_x0=False))
    process = diffusion.respace(ts)
    j = torch.full((4,), 4)
    p = process.p_mean_variance(pred.x0_hat, x_T, j, "learned", var_interp=pred.var_interp)
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(step.x, p.mean + (0.5 * p.log_variance).exp() * z)
    # The respaced bounds differ from the original process's at the same t (the point of recomputing them).
    assert not torch.allclose(process.log_beta[4], diffusion.log_beta[ts[0]])


def test_learn_sigma_false_samples_as_before(diffusion):
    """A fixed-variance model: the default variance='auto' is today's 'small', and both equal DDPM Algorithm 2
    (eq. 11 mean, sigma^2 = beta_tilde) written out by hand with the same noise."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=4, base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[],
               num_groups=4, dropout=0.0).eval()  # fmt: skip
    den = Denoiser(net, diffusion)
    assert not den.learn_sigma and net.out_channels == 1
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    ts = make_timesteps(T, None)
    auto = ddpm_sample(den, x_T, ts, generator=torch.Generator().manual_seed(3), clip_x0=False)
    g3 = torch.Generator().manual_seed(3)
    small = ddpm_sample(den, x_T, ts, generator=g3, clip_x0=False, variance="small")
    assert torch.equal(auto, small)
    beta = linear_betas(T).double()
    alpha_bar, _, _, log_beta_tilde = tables64(beta)
    g, x = torch.Generator().manual_seed(3), x_T.double()
    with torch.no_grad():
        for t in range(T - 1, -1, -1):
            eps = net(x.float(), torch.full((3,), t)).double()
            mean = (x - beta[t] / (1 - alpha_bar[t]).sqrt() * eps) / (1 - beta[t]).sqrt()  # DDPM eq. (11)
            z = torch.randn(x.shape, generator=g).double() if t > 0 else 0
            x = mean + (0.5 * log_beta_tilde[t]).exp() * z
    torch.testing.assert_close(auto.double(), x, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- L_hybrid and L_vlb
def expected_vb_bpd(x0, x_t, t, eps_hat, v, beta):
    """iDDPM's L_t in bits/dim, float64: KL(q(x_{t-1}|x_t,x0) || N(mu_theta, Sigma_theta)) for t >= 1, the
    discretised Gaussian decoder NLL (DDPM eq. 13) for t = 0."""
    alpha_bar, alpha_bar_prev, beta_tilde, log_beta_tilde = tables64(beta)
    x0, x_t, eps_hat, v = x0.double(), x_t.double(), eps_hat.double(), v.double()
    out = []
    for i, ti in enumerate(t.tolist()):
        log_var = v[i] * math.log(beta[ti]) + (1 - v[i]) * log_beta_tilde[ti]  # iDDPM eq. (15)
        mu = (x_t[i] - beta[ti] / math.sqrt(1 - alpha_bar[ti]) * eps_hat[i]) / math.sqrt(1 - beta[ti])  # DDPM eq. (11)
        if ti == 0:
            scale = (0.5 * log_var).exp()
            cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
            upper = torch.where(x0[i] > 1 - 1e-3, torch.ones_like(mu), cdf((x0[i] + 1 / 255 - mu) / scale))
            lower = torch.where(x0[i] < -1 + 1e-3, torch.zeros_like(mu), cdf((x0[i] - 1 / 255 - mu) / scale))
            out.append(-torch.log(upper - lower).mean() / math.log(2))
        else:
            mu_q = (alpha_bar_prev[ti].sqrt() * beta[ti] / (1 - alpha_bar[ti]) * x0[i]
                    + (1 - beta[ti]).sqrt() * (1 - alpha_bar_prev[ti]) / (1 - alpha_bar[ti]) * x_t[i])  # fmt: skip
            lq = log_beta_tilde[ti]
            kl = 0.5 * (-1 + log_var - lq + (lq - log_var).exp() + (mu_q - mu) ** 2 * (-log_var).exp())
            out.append(kl.mean() / math.log(2))
    return torch.stack(out)


@pytest.fixture
def fixed_inputs(diffusion):
    g = torch.Generator().manual_seed(4)
    B = 6
    x0 = (torch.randint(0, 256, (B, 1, 3, 3), generator=g).float() / 127.5 - 1).clamp(-1, 1)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the edge bins
    t = torch.tensor([0, 0, 1, 17, 50, T - 1])
    eps = torch.randn(x0.shape, generator=g)
    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], 1)
    return x0, t, eps, out


def test_hybrid_loss_matches_the_papers_formula_and_stops_the_gradient_on_the_mean(diffusion, fixed_inputs):
    x0, t, eps, out = fixed_inputs
    den = Denoiser(FixedOutput(out), diffusion)
    loss = HybridLoss()(den, x0, t, eps)
    eps_hat, v = out.chunk(2, 1)
    x_t = diffusion.q_sample(x0, t, eps)
    simple = ((eps.double() - eps_hat.double()) ** 2).flatten(1).mean(1)
    vb = expected_vb_bpd(x0, x_t, t, eps_hat, (v + 1) / 2, linear_betas(T).double())
    torch.testing.assert_close(loss.double(), simple + 0.001 * T * vb, rtol=1e-4, atol=1e-5)  # iDDPM eq. (16)
    # Stop-gradient: the eps channels get exactly L_simple's gradient, the variance channels L_vlb's.
    loss.sum().backward()
    grad_eps, grad_v = den.net.out.grad.chunk(2, 1)
    torch.testing.assert_close(grad_eps, 2 * (eps_hat - eps) / eps[0].numel())
    assert grad_v.abs().sum() > 0


def test_vlb_loss_matches_the_papers_formula_and_trains_the_mean(diffusion, fixed_inputs):
    x0, t, eps, out = fixed_inputs
    den = Denoiser(FixedOutput(out), diffusion)
    loss = VLBLoss()(den, x0, t, eps)
    eps_hat, v = out.chunk(2, 1)
    vb = expected_vb_bpd(x0, diffusion.q_sample(x0, t, eps), t, eps_hat, (v + 1) / 2, linear_betas(T).double())
    torch.testing.assert_close(loss.double(), T * vb, rtol=1e-4, atol=1e-4)
    loss.sum().backward()
    grad_eps, _ = den.net.out.grad.chunk(2, 1)
    assert grad_eps[2:].abs().sum() > 0  # unlike L_hybrid's L_vlb term, the mean is trained here


def test_objectives_refuse_the_wrong_network(diffusion):
    fixed = Denoiser(FixedOutput(torch.zeros(1, 1, 2, 2), learn_sigma=False), diffusion)
    learned = Denoiser(FixedOutput(torch.zeros(1, 2, 2, 2)), diffusion)
    with pytest.raises(ConfigError, match="learn_sigma=true"):
        HybridLoss().check(fixed)
    with pytest.raises(ConfigError, match="learn_sigma=true"):
        VLBLoss().check(fixed)
    with pytest.raises(ConfigError, match="objective=hybrid"):
        SimpleLoss().check(learned)


# ---------------------------------------------------------------- timestep samplers
def test_uniform_sampler_draws_what_randint_draws():
    t, w = UniformSampler().sample(16, T, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(t, torch.randint(0, T, (16,), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(w, torch.ones(16))


def test_importance_sampler_is_uniform_in_warm_up_then_proportional_to_the_rms_loss():
    s = ImportanceSampler(4, history_per_term=10, uniform_prob=0.0)
    for _ in range(9):
        s.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    s.update(torch.arange(3), torch.tensor([1.0, 2.0, 3.0]))
    assert not s.warmed_up()  # t = 3 has only 9 losses
    torch.testing.assert_close(s.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    _, w = s.sample(8, 4, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.ones(8))
    s.update(torch.tensor([3]), torch.tensor([4.0]))
    assert s.warmed_up()
    torch.testing.assert_close(s.probabilities(), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10)
    # Losses that vary: sqrt(E[L^2]) over the last 10, older ones forgotten.
    s.update(torch.tensor([0] * 10), torch.tensor([3.0, 4.0] * 5))
    expected = torch.tensor([math.sqrt(12.5), 2.0, 3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(s.probabilities(), expected / expected.sum())
    # Draws follow p, and weights 1 / (T p_t) make the estimate unbiased.
    t, w = s.sample(40_000, 4, "cpu", torch.Generator().manual_seed(1))
    freq = torch.bincount(t, minlength=4).double() / len(t)
    torch.testing.assert_close(freq, s.probabilities(), atol=0.01, rtol=0)
    torch.testing.assert_close(w.double(), 1 / (4 * s.probabilities()[t]), rtol=1e-6, atol=0)


def test_importance_sampler_mixes_in_the_uniform_distribution():
    s = ImportanceSampler(2, history_per_term=1, uniform_prob=0.1)
    s.update(torch.tensor([0, 1]), torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(s.probabilities(), torch.tensor([0.05, 0.95], dtype=torch.float64))


def test_importance_sampler_state_round_trips_and_checks_its_shape():
    s = ImportanceSampler(5, history_per_term=2)
    s.update(torch.tensor([0, 1, 1, 2, 3, 4, 0, 2, 3, 4, 4]), torch.arange(11.0))
    r = ImportanceSampler(5, history_per_term=2)
    r.load_state_dict(s.state_dict())
    torch.testing.assert_close(r.probabilities(), s.probabilities())
    draw = lambda sampler: sampler.sample(6, 5, "cpu", torch.Generator().manual_seed(0))[0]
    assert torch.equal(draw(r), draw(s))
    with pytest.raises(ConfigError, match="same schedule"):
        ImportanceSampler(6, history_per_term=2).load_state_dict(s.state_dict())


def test_vlb_training_keeps_its_importance_history_across_resume(train_cfg, tmp_path):
    over = ["objective=vlb", "model.learn_sigma=true", "objective.timestep_sampler.history_per_term=2"]
    train(train_cfg(*over))
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["timestep_sampler"]
    assert (first["count"] <= 2).all() and int(first["count"].sum()) > 2 * 32  # 6 steps of 32 draws, 2 kept per t
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(train_cfg(*over, "trainer.max_steps=8", f"ckpt_path={ckpt}", run_dir=tmp_path / "resumed"))
    second = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["timestep_sampler"]
    # 2 more steps draw 64 timesteps: more than that in the history means the saved one was restored.
    assert (second["count"] >= first["count"]).all() and int(second["count"].sum()) > 2 * 32


def test_hybrid_training_and_learned_sigma_sampling_run(train_cfg, tmp_path):
    metrics = train(train_cfg("objective=hybrid", "model.learn_sigma=true"))
    assert math.isfinite(metrics["train/loss"])
    assert list((tmp_path / "run" / "grids").glob("*.png"))  # grids drawn with the learned variance


def test_simple_objective_with_learned_sigma_is_refused_before_training(train_cfg):
    with pytest.raises(ConfigError, match="objective=hybrid"):
        train(train_cfg("model.learn_sigma=true"))


# ---------------------------------------------------------------- AdaGN
def test_scale_shift_norm_is_groupnorm_times_one_plus_scale_plus_shift():
    torch.manual_seed(0)
    block = ResBlock(4, 4, emb_dim=6, num_groups=2, use_scale_shift_norm=True).eval()
    x, emb = torch.randn(2, 4, 3, 3), torch.randn(2, 6)
    h = block.conv1(nn.functional.silu(block.norm1(x)))
    scale, shift = block.emb_proj(nn.functional.silu(emb))[:, :, None, None].chunk(2, 1)
    expected = x + block.conv2(nn.functional.silu(block.norm2(h) * (1 + scale) + shift))
    torch.testing.assert_close(block(x, emb), expected)
    assert block.emb_proj.out_features == 8
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
               num_groups=4, learn_sigma=True, use_scale_shift_norm=True)  # fmt: skip
    assert net(torch.randn(2, 1, 8, 8), torch.tensor([0, 5])).shape == (2, 2, 8, 8)


def test_ddim_and_dpm_solver_ignore_the_variance_and_bits_per_dim_uses_it(diffusion):
    from ddpmlab.metrics.nll import bits_per_dim
    from ddpmlab.samplers import Sampler

    g = torch.Generator().manual_seed(6)
    eps_out = torch.randn(3, 1, 2, 2, generator=g) * 0.1
    a = Denoiser(FixedOutput(torch.cat([eps_out, -torch.ones_like(eps_out)], 1)), diffusion)  # v = 0
    b = Denoiser(FixedOutput(torch.cat([eps_out, torch.ones_like(eps_out)], 1)), diffusion)  # v = 1
    x_T = torch.randn(3, 1, 2, 2, generator=g)
    for name in ("ddim", "dpm_solver"):
        sampler = Sampler(name, 10)
        torch.testing.assert_close(sampler(a, x_T), sampler(b, x_T))
    x0 = torch.rand(3, 1, 2, 2, generator=g) * 2 - 1
    bpd = {v: bits_per_dim(a, x0, stride=20, variance=v, generator=torch.Generator().manual_seed(0)).total
           for v in ("auto", "learned", "small", "large")}  # fmt: skip
    torch.testing.assert_close(bpd["auto"], bpd["learned"])
    torch.testing.assert_close(bpd["learned"], bpd["small"])  # v = 0 is beta_tilde
    assert not torch.allclose(bpd["learned"], bpd["large"])


def test_the_bound_defaults_to_the_models_own_variance(diffusion):
    """Python callers of bits_per_dim / vb_terms_bpd / evaluate_bpd get the model's variance (learned where it
    predicts one, else large), as the CLI's bpd.variance=auto does, not fixed-large on a learned-variance model."""
    from ddpmlab.metrics.nll import bits_per_dim, evaluate_bpd
    from ddpmlab.objectives.likelihood import vb_terms_bpd

    g = torch.Generator().manual_seed(7)
    out = torch.cat([torch.randn(4, 1, 2, 2, generator=g) * 0.1, torch.rand(4, 1, 2, 2, generator=g) * 2 - 1], 1)
    learned = Denoiser(FixedOutput(out), diffusion)
    fixed = Denoiser(FixedOutput(out[:, :1], learn_sigma=False), diffusion)
    x0 = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1
    t, eps = torch.tensor([0, 1, 50, 99]), torch.randn(4, 1, 2, 2, generator=g)
    for den, own in ((learned, "learned"), (fixed, "large")):
        torch.testing.assert_close(vb_terms_bpd(den, x0, t, eps), vb_terms_bpd(den, x0, t, eps, variance=own))
        default, explicit = (
            bits_per_dim(den, x0, stride=20, generator=torch.Generator().manual_seed(0), **v).total
            for v in ({}, {"variance": own})
        )
        torch.testing.assert_close(default, explicit)
        batches = [(x0, torch.zeros(4, dtype=torch.long))]
        default, explicit = evaluate_bpd(den, batches, stride=20), evaluate_bpd(den, batches, stride=20, variance=own)
        assert default["value"] == explicit["value"] and default["protocol"] == explicit["protocol"]
    large = vb_terms_bpd(learned, x0, t, eps, variance="large")
    assert not torch.allclose(vb_terms_bpd(learned, x0, t, eps), large)  # the old default differs


def test_the_decoder_term_keeps_the_diffusions_precision(diffusion):
    """On a float64 diffusion and float64 data the decoder's -log p(x_0 | x_1) is not rounded to float32."""
    from ddpmlab.objectives.likelihood import vb_terms_bpd

    d64 = diffusion.double()
    g = torch.Generator().manual_seed(8)
    den = Denoiser(FixedOutput(torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64), learn_sigma=False), d64)
    x0 = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    got = vb_terms_bpd(den, x0, torch.zeros(3, dtype=torch.long), eps)
    assert got.dtype == torch.float64
    assert not torch.equal(got, got.float().double())  # float32 rounding would lose these bits


def test_importance_history_is_gathered_from_every_ddp_rank(tmp_path):
    """Two CPU processes: each rank's history holds both ranks' losses (all-gathered), so they sample alike."""
    from conftest import TINY, run_cli

    run = tmp_path / "run"
    replaced = ("trainer.max_steps", "callbacks.checkpoint", "callbacks.sample_grid.every")
    overrides = [o for o in TINY if not o.startswith(replaced)]
    res = run_cli(
        "train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides, "objective=vlb",
        "model.learn_sigma=true", "objective.timestep_sampler.history_per_term=100", "trainer.max_steps=2",
        "callbacks.checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=2",
        "callbacks.denoising_chain.num_images=2", f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["timestep_sampler"]
    assert int(state["count"].sum()) == 2 * 2 * 32  # 2 steps x 2 ranks x 32 samples, none dropped (history 100)
