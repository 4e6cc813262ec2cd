"""What the sampler tests share: small networks with known behaviour (the Gaussian oracle, a fixed random net),
a call recorder, and the oracle's data."""

import torch
from torch import nn

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, cosine_betas, linear_betas


class GaussianOracle(nn.Module):
    """The optimal eps-predictor for data x0 ~ N(m, s^2 I): x_t ~ N(sqrt(a) m, a s^2 + 1 - a) with a = alpha_bar_t,
    so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a)."""

    def __init__(self, diffusion: GaussianDiffusion, m: float, s: float):
        super().__init__()
        self.alpha_bar, self.m, self.s = diffusion.alpha_bar64, m, s

    def forward(self, x, t):
        a = self.alpha_bar[t].view(-1, *[1] * (x.dim() - 1))
        return ((1 - a).sqrt() * (x - a.sqrt() * self.m) / (a * self.s**2 + 1 - a)).to(x.dtype)

    def flow_map(self, x_T, t_start):
        """The probability-flow ODE's exact solution from x at t_start to t = 0 and then x_0 (alpha_bar = 1):
        the affine map that keeps (x_t - sqrt(a) m) / sqrt(a s^2 + 1 - a) fixed."""
        a = self.alpha_bar[t_start]
        return self.m + self.s * (x_T - a.sqrt() * self.m) / (a * self.s**2 + 1 - a).sqrt()

    def solver_target(self, x_T, t_start, t_end):
        """What an exact ODE solver that ends, as ours do, with the jump to x0_hat at the grid's last entry returns:
        the exact flow from t_start to t_end, then E[x0 | x_t_end]. (flow_map differs from it by a fixed amount, the
        jump's own error, which hides orders of accuracy above 2.)"""
        a0, a1 = self.alpha_bar[t_start], self.alpha_bar[t_end]
        z = (x_T - a0.sqrt() * self.m) / (a0 * self.s**2 + 1 - a0).sqrt()
        x_t = a1.sqrt() * self.m + (a1 * self.s**2 + 1 - a1).sqrt() * z
        return self.m + self.s**2 * a1.sqrt() * (x_t - a1.sqrt() * self.m) / (a1 * self.s**2 + 1 - a1)


class TinyNet(nn.Module):
    """A fixed random network that depends on x and t, so every step of a sampler matters: the Gaussian oracle of
    N(0, 0.5^2) data plus a random perturbation, which keeps the samples O(1) as a trained network would."""

    def __init__(self, diffusion: GaussianDiffusion, dim: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.oracle = GaussianOracle(diffusion, 0.0, 0.5)
        self.W = torch.randn(dim, dim, generator=g) / dim**0.5
        self.emb = torch.randn(diffusion.T, dim, generator=g)

    def forward(self, x, t):
        return self.oracle(x, t) + 0.3 * torch.tanh(x @ self.W + self.emb[t].view(-1, 1, 1, self.W.shape[0]))


class Recorder(nn.Module):
    """Wraps a network and records the timesteps it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, t):
        assert (t == t[0]).all()
        self.seen.append(int(t[0]))
        return self.net(x, t)


def linear(T=1000):
    return GaussianDiffusion(linear_betas(T) if T >= 20 else cosine_betas(T))


def x_T(n=3, seed=0, shape=(1, 2, 4)):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


M, SD = 0.1, 0.3  # the Gaussian data N(M, SD^2) of the oracle tests


def make_oracle():
    """(diffusion, the optimal eps-predictor of N(M, SD^2) data, its Denoiser, 4000 x_T)."""
    d = linear(1000)
    net = GaussianOracle(d, M, SD)
    return d, net, Denoiser(net, d), x_T(4000, seed=3, shape=(1, 2, 2))
