"""The noisy, time-conditioned classifier of classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1 and App. C):
the U-Net's encoder half (its downsampling path and middle block) then attention pooling to class logits,
p_phi(y | x_t, t). Knows nothing of schedules: (x_t [B,C,H,W], t [B]) -> logits [B,K]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpmlab.networks.embeddings import TimeEmbedding
from ddpmlab.networks.layers import Downsample, ResBlock, SelfAttention, group_norm
from ddpmlab.networks.unet import check_image_size


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP; the ADM classifier's head): the mean of the H*W positions, with a learned position
    embedding on every token, queries all of them; its output token, projected, gives the logits."""

    def __init__(self, spatial: int, channels: int, num_heads: int, out_dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(channels, spatial * spatial + 1) / channels**0.5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, out_dim, 1)
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.pooled(x))

    def logits(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled[:, :, None])[:, :, 0]  # [B,K]

    def pooled(self, x: Tensor) -> Tensor:
        """The output token before its projection to logits: the classifier's penultimate features [B,C]."""
        B, C = x.shape[:2]
        x = x.reshape(B, C, -1)  # [B,C,HW]
        x = torch.cat([x.mean(-1, keepdim=True), x], -1) + self.pos[None]  # [B,C,HW+1], mean token first
        q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, C // self.num_heads, -1).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only the mean token's query: [B,heads,1,C/heads]
        return h.transpose(-1, -2).reshape(B, C)


class NoisyClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_heads: int = 4,
        num_groups: int = 32,
        use_scale_shift_norm: bool = True,
    ):
        super().__init__()
        check_image_size(image_size, channel_mult)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, base_channels * mult, emb_dim, dropout, num_groups, use_scale_shift_norm)]
                ch = base_channels * mult
                if res in attn_resolutions:
                    layers.append(SelfAttention(ch, num_heads, num_groups))
                self.down.append(nn.ModuleList(layers))
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                res //= 2
        self.mid = nn.ModuleList([
            ResBlock(ch, ch, emb_dim, dropout, num_groups, use_scale_shift_norm),
            SelfAttention(ch, num_heads, num_groups),
            ResBlock(ch, ch, emb_dim, dropout, num_groups, use_scale_shift_norm),
        ])  # fmt: skip
        self.norm_out = group_norm(ch, num_groups)
        self.pool = AttentionPool2d(res, ch, num_heads, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.pool.logits(self.features(x, t))  # [B,K]

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        """The penultimate features [B,C]: the attention-pooled token the logits are a projection of."""
        emb = self.time_embed(t)
        h = self.conv_in(x)
        for layers in [*self.down, self.mid]:
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.pool.pooled(F.silu(self.norm_out(h)))
