"""Captions to token ids for the learned text encoder: a word-level tokenizer whose vocabulary is built from the
training captions and stored with the model (in its config), so a checkpoint tokenizes prompts as it was trained.

Word-level rather than BPE (the ``tokenizers`` library): the captions this encoder is trained on from scratch come
from a small closed vocabulary (templated digit-pair captions; a captioned folder's own words), where every word is
seen many times and sub-words would only lengthen the sequences cross-attention reads; and a prompt with a word
outside the vocabulary can then be refused naming that word, instead of being split into pieces the encoder never
learned to combine. (A pretrained tokenizer comes with ``text_encoder=clip``.)

Pure Python and torch: no Lightning, no Hydra.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ddpmlab.errors import ConfigError

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1; words follow, sorted
WORD = re.compile(r"[a-z0-9]+")


def words(caption: str) -> list[str]:
    """A caption's words: lowercase runs of letters and digits (punctuation and spacing are dropped)."""
    return WORD.findall(str(caption).lower())


class WordTokenizer:
    """Captions -> (tokens [B,L] long, token_mask [B,L] bool, True = a word), padded to ``max_length``.

    ``vocab``: the words, in id order after the two specials (pad 0, unknown 1). A word outside it is refused,
    named, unless ``unknown_ok`` (the encoder was then trained with the unknown token and maps it there)."""

    def __init__(self, vocab: Sequence[str], max_length: int, unknown_ok: bool = False):
        self.vocab = [str(w) for w in vocab]
        if len(set(self.vocab)) != len(self.vocab) or any(w in (PAD, UNK) or not WORD.fullmatch(w) for w in vocab):
            raise ConfigError("text_encoder.vocab must list distinct lowercase words (letters and digits only)")
        self.ids = {w: i + 2 for i, w in enumerate(self.vocab)}
        self.max_length, self.unknown_ok = int(max_length), bool(unknown_ok)
        if self.max_length < 1:
            raise ConfigError(f"text_encoder.max_length={max_length} must be >= 1")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    @staticmethod
    def build_vocab(captions: Iterable[str]) -> list[str]:
        """The sorted distinct words of ``captions`` (the training captions)."""
        return sorted({w for c in captions for w in words(c)})

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        split = [words(c) for c in captions]
        unknown = sorted({w for ws in split for w in ws if w not in self.ids})
        if unknown and not self.unknown_ok:
            shown = ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise ConfigError(
                f"the prompt has word(s) the text encoder never saw in training: {shown}; use words of its vocabulary "
                f"({len(self.vocab)} words, e.g. {', '.join(self.vocab[:12])})"
            )
        longest = max((len(ws) for ws in split), default=0)
        if longest > self.max_length:
            caption = next(c for c, ws in zip(captions, split, strict=True) if len(ws) == longest)
            raise ConfigError(
                f"the prompt {caption!r} has {longest} words, more than the text encoder's context length of "
                f"{self.max_length}: shorten it"
            )
        tokens = torch.zeros(len(split), self.max_length, dtype=torch.long)
        for i, ws in enumerate(split):
            tokens[i, : len(ws)] = torch.tensor([self.ids.get(w, 1) for w in ws], dtype=torch.long)
        return tokens, tokens != 0

    def decode(self, tokens: Tensor, token_mask: Tensor) -> list[str]:
        """The captions of token ids (unknown words as <unk>): what a row of a batch said."""
        names = [PAD, UNK, *self.vocab]
        return [" ".join(names[i] for i, m in zip(row.tolist(), mask.tolist(), strict=True) if m)
                for row, mask in zip(tokens, token_mask, strict=True)]  # fmt: skip
