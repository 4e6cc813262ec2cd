import pytest
import torch

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, cosine_betas, extract, linear_betas
from ddpmlab.diffusion.parameterization import clip_x0


def test_tables_are_float32_buffers_not_in_state_dict(diffusion):
    assert diffusion.alpha_bar.dtype == torch.float32
    assert diffusion.state_dict() == {}  # the config rebuilds them; a checkpoint cannot contradict it
    assert diffusion.alpha_bar_prev[0] == 1 and torch.allclose(diffusion.alpha_bar_prev[1:], diffusion.alpha_bar[:-1])


def test_extract_gathers_and_broadcasts(diffusion):
    t = torch.tensor([0, 5, 999])
    out = extract(diffusion.beta, t, (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert torch.equal(out.flatten(), diffusion.beta[t])


def test_q_sample_has_the_moments_of_eq_4(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t_ in (0, 300, 999):
        t = torch.full((x0.shape[0],), t_)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        ab = diffusion.alpha_bar[t_].item()
        assert x_t.mean().item() == pytest.approx(ab**0.5 * 0.7, abs=5e-3)
        assert x_t.var().item() == pytest.approx(1 - ab, abs=5e-3)


@pytest.mark.parametrize("schedule", [linear_betas, cosine_betas])
def test_posterior_is_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): product of two Gaussians, in float64."""
    betas = schedule(1000)
    d = GaussianDiffusion(betas)
    alpha = 1 - betas
    alpha_bar = torch.cumprod(alpha, 0)
    x0, x_t = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    for t_ in (1, 10, 500, 999):
        ab_prev = alpha_bar[t_ - 1]
        precision = 1 / (1 - ab_prev) + alpha[t_] / betas[t_]
        var = 1 / precision
        mean = var * (ab_prev.sqrt() * x0 / (1 - ab_prev) + alpha[t_].sqrt() * x_t / betas[t_])
        t = torch.full((4,), t_)
        post = d.q_posterior(x0.float(), x_t.float(), t)
        assert torch.allclose(post.mean.double(), mean, atol=1e-5)
        assert post.variance[0].item() == pytest.approx(var.item(), rel=1e-5)
    # At t = 0 (paper's t = 1) the posterior is a point mass at x0
    post = d.q_posterior(x0.float(), x_t.float(), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(post.mean, x0.float(), atol=1e-6) and post.variance.abs().max() == 0


def test_eps_x0_v_round_trips(diffusion):
    x0, eps = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 100, 500, 800, 990, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    assert torch.allclose(diffusion.x0_from_eps(x_t, t, eps), x0, atol=2e-3)
    assert torch.allclose(diffusion.eps_from_x0(x_t, t, x0)[:7], eps[:7], atol=2e-3)  # ill-posed as alpha_bar -> 0
    v = diffusion.v_from_x0_eps(x0, t, eps)
    assert torch.allclose(diffusion.x0_from_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(diffusion.eps_from_v(x_t, t, v), eps, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_denoiser_parameterizations_agree_with_an_exact_network(diffusion, prediction):
    """A 'network' that returns the true target must give back the true eps and x0 in every parameterization."""
    x0, eps = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    t = torch.tensor([3, 50, 200, 400, 600, 900])
    x_t = diffusion.q_sample(x0, t, eps)
    target = {"eps": eps, "x0": x0, "v": diffusion.v_from_x0_eps(x0, t, eps)}[prediction]

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            return target

    den = Denoiser(Oracle(), diffusion, prediction)
    pred = den(x_t, t)
    assert torch.allclose(pred.x0_hat, x0, atol=1e-3) and torch.allclose(pred.eps_hat, eps, atol=1e-3)
    assert torch.allclose(den.output_of(pred, x_t, t), den.target(x0, t, eps), atol=1e-3)


def test_p_mean_variance_small_and_large(diffusion):
    x0, x_t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([500, 1])
    small = diffusion.p_mean_variance(x0, x_t, t, "small")
    large = diffusion.p_mean_variance(x0, x_t, t, "large")
    assert torch.allclose(small.mean, diffusion.q_posterior(x0, x_t, t).mean)
    assert torch.allclose(small.mean, large.mean)
    assert small.variance.flatten().tolist() == pytest.approx(diffusion.beta_tilde[t].tolist(), rel=1e-5)
    assert large.variance.flatten().tolist() == pytest.approx(diffusion.beta[t].tolist(), rel=1e-5)
    # t = 0: log beta_tilde_0 = -inf, so both use beta_tilde_1 (improved-diffusion)
    z = diffusion.p_mean_variance(x0, x_t, torch.tensor([0, 0]), "small")
    assert torch.isfinite(z.log_variance).all()
    with pytest.raises(ValueError):
        diffusion.p_mean_variance(x0, x_t, t, "medium")


def test_clip_x0_keeps_eps_consistent(diffusion):
    x0_hat, eps_hat = torch.randn(4, 1, 3, 3) * 3, torch.randn(4, 1, 3, 3)
    t = torch.tensor([10, 100, 500, 900])
    x_t = diffusion.q_sample(x0_hat, t, eps_hat)
    from ddpmlab.diffusion import Prediction

    clipped = clip_x0(Prediction(eps_hat, x0_hat), diffusion, x_t, t)
    assert clipped.x0_hat.abs().max() <= 1
    assert torch.allclose(diffusion.q_sample(clipped.x0_hat, t, clipped.eps_hat), x_t, atol=1e-4)


def test_respace_on_the_full_grid_is_the_identity(diffusion):
    r = diffusion.respace(torch.arange(1000))
    for name in ("beta", "alpha_bar", "beta_tilde", "mu_tilde_coef_x0", "mu_tilde_coef_xt"):
        assert torch.allclose(getattr(r, name), getattr(diffusion, name), rtol=1e-5, atol=1e-9), name


def test_respace_keeps_alpha_bar_at_the_kept_steps(diffusion):
    kept = torch.tensor([0, 99, 199, 499, 999])
    r = diffusion.respace(kept)
    assert r.T == 5 and torch.allclose(r.alpha_bar, diffusion.alpha_bar[kept], rtol=1e-6)
