"""The first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1 and Appendix G): a convolutional
autoencoder x [B,C,H,W] -> z [B,c,H/f,W/f] -> x_hat, f = 2^(len(channel_mult) - 1), in two variants:

- ``regularizer="kl"`` (LDM's KL-reg): the encoder gives a diagonal Gaussian posterior q(z|x) = N(mu, sigma^2);
  a small KL term to N(0, I) keeps the latent space from growing arbitrarily (weight ~1e-6 in LDM);
- ``regularizer="vq"`` (LDM's VQ-reg): a vector quantiser (van den Oord et al. 2017) with a codebook of
  ``num_codes`` vectors, straight-through gradients and a commitment loss; the codebook is learned by its own
  loss term or, with ``ema_decay``, kept as an exponential moving average of the vectors assigned to it.
  As in LDM, diffusion runs on the encoder's output *before* quantisation and the decoder quantises.

A patch discriminator (pix2pix/taming's NLayerDiscriminator) is here too; the loss lives in the LightningModule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpmlab.errors import ConfigError
from ddpmlab.networks.layers import Downsample, SelfAttention, Upsample, group_norm

REGULARIZERS = ("kl", "vq")


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv twice, plus a (projected) skip: the U-Net's ResBlock without a time embedding."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, num_groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch, num_groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _mid(ch: int, num_groups: int, attention: bool) -> nn.Sequential:
    layers = [ResnetBlock(ch, ch, num_groups)]
    if attention:
        layers.append(SelfAttention(ch, 1, num_groups))
    return nn.Sequential(*layers, ResnetBlock(ch, ch, num_groups))


class Encoder(nn.Module):
    """x [B,C,H,W] -> [B,out_ch,H/f,W/f]; one Downsample between consecutive levels of ``channel_mult``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        num_groups: int,
        mid_attention: bool,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 3, padding=1)]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(ch, base_channels * mult, num_groups))
                ch = base_channels * mult
            if level != len(channel_mult) - 1:
                layers.append(Downsample(ch))
        layers += [
            _mid(ch, num_groups, mid_attention),
            group_norm(ch, num_groups),
            nn.SiLU(),
            nn.Conv2d(ch, out_channels, 3, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """z [B,c,h,w] -> [B,C,h*f,w*f], the encoder mirrored (one more ResnetBlock per level, as in LDM)."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        num_groups: int,
        mid_attention: bool,
    ):
        super().__init__()
        ch = base_channels * channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), _mid(ch, num_groups, mid_attention)]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(ch, base_channels * mult, num_groups))
                ch = base_channels * mult
            if level:
                layers.append(Upsample(ch))
        layers += [group_norm(ch, num_groups), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)  # the "last layer" of LDM's adaptive GAN weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.layers(z))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from moments [B,2c,h,w] (mean first, as LDM)."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype, generator=generator)
        return self.mean + self.std * eps  # reparameterisation (Kingma & Welling 2014)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q(z|x) || N(0, I)) per sample [B] = 1/2 sum(mean^2 + var - 1 - logvar) (Kingma & Welling, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Quantized(NamedTuple):
    z_q: Tensor  # [B,c,h,w], straight-through: forward = nearest code, backward = identity to z_e
    indices: Tensor  # [B,h,w] long
    loss: Tensor  # [] codebook + commitment terms (VQ-VAE eq. 3)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation to a codebook e [K, c] (van den Oord et al. 2017, VQ-VAE).

    Loss (eq. 3): ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2. With ``ema_decay`` the codebook term is dropped and
    the codebook follows an exponential moving average of its assigned vectors instead (VQ-VAE, Appendix A.1):
    N_k <- d N_k + (1 - d) n_k,  m_k <- d m_k + (1 - d) sum_{i: k} z_e_i,  e_k = m_k / N_k (Laplace-smoothed N).
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, ema_decay: float | None = None, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim, self.beta, self.ema_decay, self.eps = num_codes, dim, beta, ema_decay, eps
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)
        if ema_decay is not None:
            self.codebook.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", self.codebook.weight.detach().clone())

    def nearest(self, z_e: Tensor) -> Tensor:
        """Index of the nearest code (squared Euclidean distance) for every vector of z_e [B,c,h,w] -> [B,h,w]."""
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.dim)
        e = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # [BHW, K]
        return dist.argmin(1).view(z_e.shape[0], *z_e.shape[2:])

    def lookup(self, indices: Tensor) -> Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)  # [B,h,w] -> [B,c,h,w]

    def forward(self, z_e: Tensor) -> Quantized:
        indices = self.nearest(z_e)
        e = self.lookup(indices)
        commitment = F.mse_loss(z_e, e.detach())
        if self.ema_decay is None:
            loss = F.mse_loss(e, z_e.detach()) + self.beta * commitment  # VQ-VAE eq. (3)
        else:
            loss = self.beta * commitment
            if self.training:
                self._ema_update(z_e.detach(), indices)
        z_q = z_e + (e - z_e).detach()  # straight-through estimator: d z_q / d z_e = I
        return Quantized(z_q, indices, loss)

    @torch.no_grad()
    def _ema_update(self, z_e: Tensor, indices: Tensor) -> None:
        d = self.ema_decay
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.dim)
        onehot = F.one_hot(indices.flatten(), self.num_codes).to(flat.dtype)  # [BHW, K]
        self.ema_count.mul_(d).add_(onehot.sum(0), alpha=1 - d)
        self.ema_sum.mul_(d).add_(onehot.t() @ flat, alpha=1 - d)
        n = self.ema_count.sum()
        count = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
        self.codebook.weight.copy_(self.ema_sum / count[:, None])


class Autoencoder(nn.Module):
    """LDM's first stage. ``encode(x)`` -> the latent the diffusion model sees (KL: a posterior sample, or its mean
    with ``sample=False``; VQ: the pre-quantisation z_e); ``decode(z)`` -> x_hat (VQ quantises first);
    ``forward(x)`` -> (x_hat, regulariser loss [B]) for training."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        regularizer: str = "kl",
        num_codes: int = 256,
        beta: float = 0.25,
        ema_decay: float | None = 0.99,
        num_groups: int = 32,
        mid_attention: bool = True,
    ):
        super().__init__()
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
        self.factor = 2 ** (len(channel_mult) - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size={image_size} is not a multiple of the downsampling factor f={self.factor}")
        self.in_channels, self.image_size, self.latent_channels = in_channels, image_size, latent_channels
        self.latent_size, self.regularizer = image_size // self.factor, regularizer
        enc_out = 2 * latent_channels if regularizer == "kl" else latent_channels
        arch = (base_channels, channel_mult, num_res_blocks, num_groups, mid_attention)
        self.encoder = Encoder(in_channels, enc_out, *arch)
        self.quant_conv = nn.Conv2d(enc_out, enc_out, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(latent_channels, in_channels, *arch)
        self.quantizer = VectorQuantizer(num_codes, latent_channels, beta, ema_decay) if regularizer == "vq" else None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the latent the diffusion model sees, each [B,c,H/f,W/f]: KL: q(z|x)'s; VQ: (z_e, 0)."""
        if self.regularizer == "vq":
            z_e = self.quant_conv(self.encoder(x))
            return z_e, torch.zeros_like(z_e)
        q = self.posterior(x)
        return q.mean, q.std

    def encode(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """x [B,C,H,W] in [-1, 1] -> z [B,c,H/f,W/f]: a posterior sample (KL; its mean with ``sample=False``)
        or z_e (VQ)."""
        mean, std = self.moments(x)
        if not sample or self.regularizer == "vq":
            return mean
        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)

    def decode(self, z: Tensor) -> Tensor:
        """z [B,c,h,w] -> x_hat [B,C,h*f,w*f] (VQ: through the quantiser, as LDM decodes VQ latents)."""
        if self.quantizer is not None:
            z = self.quantizer(z).z_q
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x_hat, regulariser per sample [B]): KL(q(z|x) || N(0,I)) for KL-reg, the VQ loss for VQ-reg."""
        if self.quantizer is None:
            q = self.posterior(x)
            return self.decoder(self.post_quant_conv(q.sample())), q.kl()
        quantized = self.quantizer(self.quant_conv(self.encoder(x)))
        x_hat = self.decoder(self.post_quant_conv(quantized.z_q))
        return x_hat, quantized.loss.expand(x.shape[0])

    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; taming-transformers' NLayerDiscriminator): one logit per overlapping patch,
    [B,C,H,W] -> [B,1,H',W']. GroupNorm instead of BatchNorm, so that fake and real batches do not share
    statistics through the norm."""

    def __init__(self, in_channels: int = 1, base_channels: int = 64, num_layers: int = 3, num_groups: int = 32):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), group_norm(out, num_groups), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class DiffusersAutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE) behind the first-stage interface (moments / encode /
    decode). ``config``: the model's config.json as a dict; weights come from its folder or a checkpoint."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ConfigError("a diffusers AutoencoderKL first stage needs diffusers: pip install diffusers") from e
        self.vae = AutoencoderKL.from_config(dict(config))
        self.in_channels, self.latent_channels = int(config["in_channels"]), int(config["latent_channels"])
        self.factor = 2 ** (len(config["block_out_channels"]) - 1)
        self.image_size = None  # fully convolutional: any multiple of factor

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    def encode(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        mean, std = self.moments(x)
        if not sample:
            return mean
        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample
