import math

import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion, cosine_betas, linear_betas, quadratic_betas, sigmoid_betas
from ddpmlab.errors import ConfigError

ALL = [linear_betas, cosine_betas, quadratic_betas, sigmoid_betas]


def test_linear_schedule_golden_values():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    d = GaussianDiffusion(betas)
    # Golden values of DDPM's linear schedule, T = 1000
    assert d.beta_tilde[487].item() == pytest.approx(0.009792, abs=5e-7)
    assert d.alpha_bar[999].item() == pytest.approx(4.04e-5, rel=5e-3)


def test_linear_schedule_scales_with_T():
    # improved-diffusion: beta_start/end scale by 1000 / T so alpha_bar_T stays small at other T
    betas = linear_betas(100)
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)
    assert torch.prod(1 - betas).item() < 1e-3


def test_cosine_schedule_follows_eq_17():
    T, s = 1000, 0.008
    betas = cosine_betas(T, s)
    alpha_bar = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (1, 250, 500, 900):
        assert alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # the last step is clipped (Nichol & Dhariwal Sec. 3.2)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("T", [1, 50, 1000])
def test_every_schedule_is_valid(fn, T):
    betas = fn(T)
    assert betas.shape == (T,) and ((betas > 0) & (betas < 1)).all()
    GaussianDiffusion(betas)  # builds every table without nan
    assert not any(torch.isnan(b).any() for b in GaussianDiffusion(betas).buffers())


@pytest.mark.parametrize(
    "kwargs", [dict(beta_end=1.5), dict(beta_start=0.0), dict(beta_start=-0.1), dict(num_timesteps=0)]
)
def test_bad_schedule_values_are_refused_clearly(kwargs):
    with pytest.raises(ConfigError, match=r"beta_end|beta_start|num_timesteps"):
        linear_betas(**kwargs)


def test_betas_that_leave_the_unit_interval_after_scaling_are_refused():
    # 0.02 * 1000 / 10 = 2.0: valid-looking config values, invalid betas
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        linear_betas(10, beta_end=0.02)
