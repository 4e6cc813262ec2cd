"""Sinusoidal timestep embeddings (Vaswani et al. 2017; as used by DDPM's U-Net, Appendix B)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0, flip_sin_to_cos: bool = False
) -> Tensor:
    """t [B] (float or int) -> [B, dim]: [sin(t w_k), cos(t w_k)], w_k = max_period^(-k / (dim/2 - freq_shift)).

    ``freq_shift`` = 1 is DDPM's TensorFlow code (and the models converted from it), which divides by half - 1;
    ``flip_sin_to_cos`` puts the cosines first. Both as diffusers' ``Timesteps`` names them."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], 1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear, giving the vector every ResBlock receives."""

    def __init__(self, base_channels: int, emb_dim: int, freq_shift: float = 0.0, flip_sin_to_cos: bool = False):
        super().__init__()
        self.base_channels = base_channels
        self.freq_shift, self.flip_sin_to_cos = freq_shift, flip_sin_to_cos
        self.mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.base_channels, 10000.0, self.freq_shift, self.flip_sin_to_cos))
