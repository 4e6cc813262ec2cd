"""The learned text encoder (``text_encoder=learned`` / ``pooled``): a small Transformer trained from scratch jointly
with the U-Net, as LDM's text-to-image models on LAION train their "BERT" from scratch (Rombach et al. 2022,
Sec. 4.3.1, a transformer tau_theta mapping tokens to the context the U-Net's cross-attention reads).

tokens [B,L] -> a learned start vector, then the token embeddings, each plus a learned positional embedding ->
``depth`` pre-LayerNorm Transformer encoder layers (self-attention over the real tokens only) -> LayerNorm:
context [B,1+L,dim], with its mask [B,1+L] (the start position is always attendable, so the empty caption -- the
null of classifier-free guidance -- still has a context: the start vector seen alone).

``pooled``: the lecture's "single vector embedding": the context averaged over its real positions, [B,1,dim]; the
U-Net then adds it to the time embedding instead of attending to the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddpmlab.errors import ConfigError
from ddpmlab.text import WordTokenizer


class TransformerTextEncoder(nn.Module):
    def __init__(
        self,
        vocab: Sequence[str] | None = None,
        max_length: int = 16,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        pooled: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if vocab is None:
            raise ConfigError(
                "text_encoder.vocab is empty: it is built from the training captions when training starts; a model "
                "outside training needs the vocabulary its checkpoint stores"
            )
        if dim % heads:
            raise ConfigError(f"text_encoder.dim={dim} does not split into text_encoder.heads={heads} heads")
        self.tokenizer = WordTokenizer(vocab, max_length)
        self.dim, self.pooled = int(dim), bool(pooled)
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, dim, padding_idx=0)
        # Words and positions start on the same scale (BERT's N(0, 0.02) for both): torch's N(0, 1) word embeddings
        # would drown the positions, and the encoder would start, and long stay, a bag of words.
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.token_embed.weight.data[0].zero_()
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(max_length + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        B, L = tokens.shape
        h = torch.cat([self.start.expand(B, 1, -1), self.token_embed(tokens)], dim=1) + self.pos_embed[: L + 1]
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=tokens.device), token_mask.bool()], dim=1)
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        if self.pooled:  # the mean over the real positions (start vector included): one vector per caption
            w = mask[..., None].to(h.dtype)
            return (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True), mask[:, :1]
        return h, mask
