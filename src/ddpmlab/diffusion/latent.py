"""Latent diffusion (Rombach et al. 2022): the Denoiser contract on z = s * E(x), with a frozen first stage.

Every loss and sampler sees only latents z [B,c,h,w]; ``decode(z)`` = D(z / s) brings samples back to pixels.
s is LDM's scale factor 1 / std(E(x)) over training images (LDM Sec. 4.3.2 / Appendix G: "we rescale the
latents to unit standard deviation"), computed once and kept as a buffer, so it travels in every checkpoint.
Latents are not bounded like pixels: samplers must not clip x0_hat to [-1, 1] here (``x0_range`` is None).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpmlab.diffusion.gaussian import GaussianDiffusion
from ddpmlab.diffusion.parameterization import Denoiser, PredictionType


class LatentDenoiser(Denoiser):
    """A :class:`Denoiser` over latents of ``first_stage`` (any module with ``encode(x)`` and ``decode(z)``), which
    stays frozen: no gradients, eval mode whatever ``train()`` is called with."""

    x0_range = None  # latents: no clipping of x0_hat

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        first_stage: nn.Module,
        prediction: PredictionType = "eps",
        scale_factor: float = float("nan"),
    ):
        super().__init__(net, diffusion, prediction)
        self.first_stage = first_stage.eval().requires_grad_(False)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    def train(self, mode: bool = True) -> "LatentDenoiser":
        super().train(mode)
        self.first_stage.eval()
        return self

    def trainable_parameters(self):
        return (p for name, p in self.named_parameters() if not name.startswith("first_stage."))

    @torch.no_grad()
    def fit_scale_factor(self, latents: Tensor) -> float:
        """s = 1 / std of (unscaled) latents [N,c,h,w] (LDM); stored in the ``scale_factor`` buffer."""
        self.scale_factor.fill_(1.0 / latents.float().std().item())
        return float(self.scale_factor)

    @torch.no_grad()
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels [B,C,H,W] in [-1, 1] -> the unscaled latent's (mean, std) [B,c,h,w] (std = 0: deterministic)."""
        return self.first_stage.moments(x)

    def scaled_sample(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = s * (mean + std * eps): a posterior sample, rescaled to about unit variance (LDM)."""
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
        return self.scale_factor * (mean + std * eps)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels [B,C,H,W] in [-1, 1] -> scaled latents z = s * E(x) [B,c,h,w]."""
        return self.scaled_sample(*self.moments(x), generator)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents z [B,c,h,w] -> pixels D(z / s) [B,C,H,W] (about [-1, 1]; callers clamp for display)."""
        return self.first_stage.decode(z.float() / self.scale_factor)
