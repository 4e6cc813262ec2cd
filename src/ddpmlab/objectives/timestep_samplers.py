"""How a training step draws its timesteps t (and the weight that keeps the loss an unbiased estimate).

``sample(batch_size, T, device, generator) -> (t [B] long, weight [B] float)``: the objective's per-sample loss is
multiplied by ``weight = 1 / (T p_t)``, so E_t[weight * loss_t] is the uniform-t expectation whatever p is.
``update(t, losses)`` feeds back the per-sample losses (a no-op for the uniform sampler). ``state_dict`` /
``load_state_dict`` hold plain tensors: the state travels in the training checkpoint and a resumed run goes on
with its history.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpmlab.errors import ConfigError


class TimestepSampler:
    def sample(
        self, batch_size: int, T: int, device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the per-sample losses of timesteps ``t`` (both [B])."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class UniformSampler(TimestepSampler):
    """t ~ Uniform{0..T-1}, weight 1 (DDPM Algorithm 1): draws exactly what ``torch.randint`` draws."""

    def sample(self, batch_size, T, device, generator=None):
        t = torch.randint(0, T, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)


class ImportanceSampler(TimestepSampler):
    """iDDPM Sec. 3.3: p_t proportional to sqrt(E[L_t^2]) over the last ``history_per_term`` losses of each t
    (10 in the paper), mixed with a little of the uniform distribution (``uniform_prob``, as improved-diffusion's
    LossSecondMomentResampler) so that no t is starved; uniform until every t has its full history."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        if num_timesteps < 1 or history_per_term < 1 or not 0 <= uniform_prob <= 1:
            raise ConfigError(
                f"ImportanceSampler(num_timesteps={num_timesteps}, history_per_term={history_per_term}, "
                f"uniform_prob={uniform_prob}): need T >= 1, a history of >= 1 loss per t, 0 <= uniform_prob <= 1"
            )
        self.T, self.history_per_term, self.uniform_prob = num_timesteps, history_per_term, uniform_prob
        self.history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)  # [T, K], newest last
        self.count = torch.zeros(num_timesteps, dtype=torch.long)  # losses seen per t (capped at K)

    def warmed_up(self) -> bool:
        return bool((self.count >= self.history_per_term).all())

    def probabilities(self) -> Tensor:
        """p [T] (float64): uniform during warm-up, else iDDPM Sec. 3.3's sqrt(E[L_t^2]) normalised, mixed."""
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = self.history.pow(2).mean(1).sqrt()  # sqrt(E[L_t^2]), iDDPM eq. (18)
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch_size, T, device, generator=None):
        if T != self.T:
            raise ConfigError(f"the importance sampler was built for T={self.T} but the schedule has T={T}")
        p = self.probabilities()
        if generator is not None and generator.device.type != "cpu":  # multinomial needs its generator on p's device
            p = p.to(generator.device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weight = 1.0 / (T * p[t])  # importance weight: E_p[weight L_t] = (1/T) sum_t L_t
        return t.to(device), weight.to(device=device, dtype=torch.float32)

    def update(self, t, losses):
        for ti, loss in zip(t.long().tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.count[ti] == self.history_per_term:  # full: drop the oldest
                self.history[ti, :-1] = self.history[ti, 1:].clone()
                self.history[ti, -1] = loss
            else:
                self.history[ti, self.count[ti]] = loss
                self.count[ti] += 1

    def state_dict(self):
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state):
        if state["history"].shape != self.history.shape:
            raise ConfigError(
                f"the checkpoint's timestep-sampler history has shape {list(state['history'].shape)}, this run's "
                f"{list(self.history.shape)} (T x history_per_term): resume with the same schedule and objective"
            )
        self.history = state["history"].to(torch.float64).clone()
        self.count = state["count"].to(torch.long).clone()
