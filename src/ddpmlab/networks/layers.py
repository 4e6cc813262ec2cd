"""U-Net building blocks: ResBlock, self-attention, down/up-sampling (DDPM, Appendix B); LDM's SpatialTransformer
(cross-attention to a context sequence, Rombach et al. 2022, Sec. 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, num_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(min(num_groups, channels), channels, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv, + projected time embedding, GroupNorm -> SiLU -> Dropout -> Conv, + skip.

    ``use_scale_shift_norm`` (AdaGN, iDDPM / Dhariwal & Nichol 2021 Sec. 3): the embedding gives a scale and a
    shift instead of an addition, GroupNorm(h) * (1 + scale) + shift."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, num_groups: int = 32,
        use_scale_shift_norm: bool = False, norm_eps: float = 1e-6,
    ):  # fmt: skip
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_ch, num_groups, norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = group_norm(out_ch, num_groups, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift  # AdaGN
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection (SDPA kernels).

    ``qkv``'s 3C output channels are Q, K, V in turn, each the heads in turn (channel h * C/heads + d of Q is head h's
    d-th): the layout of diffusers' separate to_q / to_k / to_v projections, stacked."""

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32, norm_eps: float = 1e-6):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups, norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2).unbind(1)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Attention(nn.Module):
    """Multi-head attention of the tokens x [B,N,dim] to ``context`` [B,L,context_dim] (itself when None) where
    ``mask`` [B,L] is True: softmax(Q K^T / sqrt(d)) V with Q = x W_Q, K = context W_K, V = context W_V (LDM eq. 3)."""

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        B, N, D = x.shape

        def split(t: Tensor) -> Tensor:  # [B, n, D] -> [B, heads, n, D/heads]
            return t.reshape(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attn_mask = None if mask is None else mask[:, None, None, :]  # padding of the context: never attended
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(h.transpose(1, 2).reshape(B, N, D))


class GEGLU(nn.Module):
    """The gated feed-forward of LDM's transformer blocks (Shazeer 2020): (x W + b) * GELU(x V + c), then a linear."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm: self-attention, cross-attention to the context, GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, None, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer: GroupNorm -> 1x1 projection -> the H*W positions as tokens through ``depth``
    transformer blocks that cross-attend to the context -> 1x1 projection, zero-initialised so that the block starts
    as the identity -> + x.

    ``positions=(H, W)`` adds a learned embedding of each of the H*W positions to the tokens after the projection (not
    in LDM, whose tokens know their place only through the convolutions' zero padding): a query then knows where it
    is, which a caption about places ("a 3 left of a 7") needs."""

    def __init__(
        self,
        channels: int,
        context_dim: int,
        num_heads: int = 1,
        num_groups: int = 32,
        depth: int = 1,
        positions: tuple[int, int] | None = None,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"cross-attention: {channels} channels do not split into {num_heads} heads")
        self.norm = group_norm(channels, num_groups)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.positions, self.pos_embed = None, None
        if positions is not None:
            self.positions = (int(positions[0]), int(positions[1]))
            self.pos_embed = nn.Parameter(torch.randn(1, self.positions[0] * self.positions[1], channels) * 0.02)
        self.blocks = nn.ModuleList([TransformerBlock(channels, context_dim, num_heads) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.pos_embed is not None:
            if (H, W) != self.positions:
                raise ValueError(f"cross-attention: positions learned for {self.positions}, got a {H}x{W} feature map")
            h = h + self.pos_embed
        for block in self.blocks:
            h = block(h, context, mask)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """A 3x3 convolution of stride 2. ``padding=1`` pads every side by one; ``padding=0`` pads only the right and
    bottom by one, as TensorFlow's "SAME" padding does for a stride-2 convolution of an even side (DDPM's own code,
    and diffusers' ``downsample_padding=0``)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"Downsample: padding={padding} must be 1 (every side) or 0 (right and bottom, as TF)")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
