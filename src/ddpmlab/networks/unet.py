"""The noise-predicting U-Net of DDPM (Ho et al. 2020, Appendix B), PixelCNN++-style.

Knows nothing of schedules: it maps (x_t [B,C,H,W], t [B], cond) -> [B,C_out,H,W], cond a
:class:`~ddpmlab.conditioning.Cond` (or a tensor of class labels, or None); with ``learn_sigma`` C_out doubles (the
prediction, then iDDPM eq. 15's variance interpolation). Conditioning: a class label's embedding is added to the
time embedding (``num_classes``); a conditioning image of ``cond_channels`` channels is resized to x_t's size and
concatenated with x_t before the first convolution (SR3; LDM Sec. 4.4); a caption (``text_encoder``, its tokens
in the Cond) is encoded into a context sequence that SpatialTransformers cross-attend to at ``context_resolutions``
and in the middle (LDM Sec. 3.3), or, from a pooled encoder, one vector added to the time embedding;
``context_positions`` adds a learned embedding of each position to the image tokens there (not in LDM).

``image_size`` is the side of a square image or (H, W); a resolution in ``attn_resolutions`` /
``context_resolutions`` is a feature map's height.

Conventions that differ between implementations of the same network are options, so that a model converted from
another (``ddpmlab.diffusers_format``) computes what it computed there: ``freq_shift`` and ``flip_sin_to_cos`` (the
sinusoid's frequencies and order, :func:`~ddpmlab.networks.embeddings.timestep_embedding`), ``norm_eps`` (every
GroupNorm's epsilon), ``downsample_padding`` (1: every side; 0: right and bottom, TensorFlow's), and
``num_head_channels`` (channels per attention head at every resolution, instead of ``num_heads`` heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddpmlab.conditioning import NULL_LABEL, Cond, image_input
from ddpmlab.errors import ConfigError
from ddpmlab.networks.embeddings import TimeEmbedding
from ddpmlab.networks.layers import Downsample, ResBlock, SelfAttention, SpatialTransformer, Upsample, group_norm


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of an ``image_size`` given as one side (a square) or as [H, W]."""
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(int(n) for n in image_size)
    if len(size) != 2:
        raise ConfigError(f"image_size={list(image_size)}: give one side (a square image) or [height, width]")
    return size


def check_image_size(image_size: int | Sequence[int], channel_mult: Sequence[int]) -> None:
    factor = 2 ** (len(channel_mult) - 1)
    for side in image_hw(image_size):
        if side < factor or side % factor:
            ok = [s for s in range(factor, 4 * factor * max(1, side // factor + 1), factor)][:4]
            raise ConfigError(
                f"image_size={image_size} cannot go through this U-Net: channel_mult={list(channel_mult)} halves the "
                f"image {len(channel_mult) - 1} times, so each side must be a multiple of {factor} (e.g. {ok}). "
                f"Resize the data (data.image_size) or use fewer levels (model.channel_mult)."
            )


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int | Sequence[int] = 32,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_groups: int = 32,
        num_classes: int | None = None,
        learn_sigma: bool = False,
        use_scale_shift_norm: bool = False,
        cond_channels: int = 0,
        text_encoder: nn.Module | None = None,
        context_dim: int | None = None,
        context_resolutions: Sequence[int] = (),
        transformer_depth: int = 1,
        context_positions: bool = False,
        freq_shift: float = 0.0,
        flip_sin_to_cos: bool = False,
        norm_eps: float = 1e-6,
        downsample_padding: int = 1,
        num_head_channels: int | None = None,
    ):
        super().__init__()
        check_image_size(image_size, channel_mult)
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma  # iDDPM eq. (15): a second set of C channels, the variance's v
        self.out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.image_size = image_size if isinstance(image_size, int) else image_hw(image_size)
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim, freq_shift, flip_sin_to_cos)
        # Classifier-free guidance (Ho & Salimans 2022): class num_classes is the learned null label.
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.cond_channels = int(cond_channels)
        # The "no image" flag of a dropped conditioning image (zeroed): a learned vector added to the embedding.
        self.image_null_embed = nn.Parameter(torch.zeros(emb_dim)) if cond_channels else None

        # Text: the encoder's context, read by cross-attention or, pooled to one vector, added to the embedding.
        self.text_encoder = text_encoder
        self.cross_attention = text_encoder is not None and not getattr(text_encoder, "pooled", False)
        if text_encoder is not None:
            encoder_dim = int(text_encoder.dim)
            if context_dim is not None and int(context_dim) != encoder_dim:
                raise ConfigError(
                    f"model.context_dim={context_dim} but the text encoder gives {encoder_dim}-wide vectors: set "
                    f"model.context_dim={encoder_dim} (or null, to take the encoder's)"
                )
            context_dim = encoder_dim
        self.context_dim = context_dim if text_encoder is not None else None
        self.context_resolutions = [int(r) for r in context_resolutions] if self.cross_attention else []
        self.pooled_proj = (
            nn.Linear(context_dim, emb_dim) if text_encoder is not None and not self.cross_attention else None
        )

        def block(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout, num_groups, use_scale_shift_norm, norm_eps)

        def attn(ch: int) -> SelfAttention:
            if num_head_channels and ch % num_head_channels:
                raise ConfigError(f"model.num_head_channels={num_head_channels} does not divide {ch} channels")
            return SelfAttention(ch, ch // num_head_channels if num_head_channels else num_heads, num_groups, norm_eps)

        height, width = image_hw(image_size)

        def cross(ch: int, res: int) -> SpatialTransformer:  # res: the feature map's height
            hw = (res, width * res // height) if context_positions else None
            return SpatialTransformer(ch, context_dim, num_heads, num_groups, transformer_depth, hw)

        self.conv_in = nn.Conv2d(in_channels + self.cond_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        chans, ch, res = [base_channels], base_channels, height
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [block(ch, base_channels * mult)]
                ch = base_channels * mult
                if res in attn_resolutions:
                    layers.append(attn(ch))
                if res in self.context_resolutions:
                    layers.append(cross(ch, res))
                self.down.append(nn.ModuleList(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch, downsample_padding)]))
                chans.append(ch)
                res //= 2
        mid = [block(ch, ch), attn(ch)]  # in this order: a model without text draws its weights as it always did
        mid += [cross(ch, res)] if self.cross_attention else []
        self.mid = nn.ModuleList([*mid, block(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [block(ch + chans.pop(), base_channels * mult)]
                ch = base_channels * mult
                if res in attn_resolutions:
                    layers.append(attn(ch))
                if res in self.context_resolutions:
                    layers.append(cross(ch, res))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.norm_out = group_norm(ch, num_groups, norm_eps)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, *context)
            else:
                h = layer(h)
        return h

    def encode_text(self, cond: Cond | None, batch: int, device) -> tuple[Tensor, Tensor]:
        """(context [B,L',context_dim], its mask [B,L']) of the Cond's tokens; without tokens, the empty caption's."""
        tokens, mask = (None, None) if cond is None else (cond.tokens, cond.token_mask)
        if tokens is None:
            tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
            mask = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        elif mask is None:
            mask = tokens != 0
        return self.text_encoder(tokens, mask)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | Tensor | None = None) -> Tensor:
        cond = Cond.of(cond)
        emb = self.time_embed(t)
        if self.label_embed is not None:
            labels = None if cond is None else cond.labels
            if labels is None:  # unconditional call of a conditional model: the null label
                labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_embed(torch.where(labels == NULL_LABEL, self.num_classes, labels))
        if self.cond_channels:
            image, null = image_input(cond, self.cond_channels, tuple(x.shape[-2:]))
            x = torch.cat([x, image.to(x.dtype)], dim=1)
            if null is not None:
                emb = emb + null.to(emb.dtype)[:, None] * self.image_null_embed
        context = None
        if self.text_encoder is not None:
            context = self.encode_text(cond, x.shape[0], x.device)
            if self.pooled_proj is not None:  # one vector for the whole caption, added like a class embedding
                emb = emb + self.pooled_proj(context[0][:, 0])
                context = None
        hs = [self.conv_in(x)]
        for layers in self.down:
            hs.append(self._run(layers, hs[-1], emb, context))
        h = self._run(self.mid, hs[-1], emb, context)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
