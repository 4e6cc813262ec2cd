"""What a sample is conditioned on: :class:`Cond`, the one container that flows from the data through the network,
the Denoiser, every objective, every sampler, ``generate()`` and classifier-free guidance; and the image tasks that
build an image condition from a clean image (super-resolution, inpainting).

The lecture's three ways to condition eps_theta(x_t, t, c), each a field of :class:`Cond`:
- a class: ``labels`` [B], an embedding added to the time embedding (or through AdaGN);
- an image: ``image`` [B,C_c,h,w], resized to x_t's size and concatenated with x_t channel-wise (SR3, Saharia et
  al. 2021; LDM, Rombach et al. 2022, Sec. 4.4; Palette / Stable Diffusion's inpainting model);
- text: ``tokens`` [B,L] with their padding ``token_mask`` [B,L] (True = a real token).

Each kind has its null, for classifier-free guidance (Ho & Salimans 2022) and condition dropout in training: the
null label (``NULL_LABEL``; a network maps it to its learned null class), a zero image flagged in ``image_null``
[B] (the network adds a learned "no image" embedding), and the empty sequence (``token_mask`` all False).

Pure tensor code: no Lightning, no Hydra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpmlab.errors import ConfigError

NULL_LABEL = -1  # the null class in a Cond; a class-conditional U-Net maps it to its own null label (num_classes)


@dataclass(frozen=True)
class Cond:
    labels: Tensor | None = None  # [B] long, NULL_LABEL = no class
    image: Tensor | None = None  # [B,C_c,h,w] in the data range, any size (the network resizes it to x_t's)
    image_null: Tensor | None = None  # [B] bool: True where the image is dropped (None: none is)
    tokens: Tensor | None = None  # [B,L] long
    token_mask: Tensor | None = None  # [B,L] bool, True = a real token (all False: the empty sequence)

    @staticmethod
    def of(cond: Cond | Tensor | None) -> Cond | None:
        """A Cond from what callers pass: a Cond, a tensor of class labels (the contract before images), or None."""
        if cond is None or isinstance(cond, Cond):
            return cond
        if isinstance(cond, Tensor):
            return Cond(labels=cond)
        raise TypeError(f"a condition is a Cond, a tensor of class labels or None, got {type(cond).__name__}")

    def _fields(self) -> dict[str, Tensor]:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def __len__(self) -> int:
        sizes = {v.shape[0] for v in self._fields().values()}
        if len(sizes) != 1:
            raise ValueError(f"a Cond's fields disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()

    def map(self, fn) -> Cond:
        """Apply ``fn`` to every tensor held (slicing, moving, repeating), batch dimension first."""
        return Cond(**{k: fn(v) for k, v in self._fields().items()})

    def __getitem__(self, index) -> Cond:
        return self.map(lambda v: v[index])

    def to(self, device) -> Cond:
        return self.map(lambda v: v.to(device))

    def repeat_interleave(self, n: int) -> Cond:
        """Each condition ``n`` times in a row: [c0, c0, ..., c1, c1, ...] (several samples per input)."""
        return self.map(lambda v: v.repeat_interleave(n, dim=0))

    def replace(self, **fields) -> Cond:
        return dataclasses.replace(self, **fields)

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """The batches one after the other; a field absent from some (image_null) counts as "not null" there."""
        out = {}
        for name in {k for c in conds for k in c._fields()}:
            parts = [getattr(c, name) for c in conds]
            if name == "image_null":  # a Cond without flags has its image everywhere
                parts = [
                    torch.zeros(len(c), dtype=torch.bool, device=c.image.device) if p is None else p
                    for p, c in zip(parts, conds, strict=True)
                ]
            elif any(p is None for p in parts):
                raise ValueError(f"cannot concatenate conditions where only some have {name}")
            out[name] = torch.cat(parts)
        return Cond(**out)

    def drop(self, mask: Tensor) -> Cond:
        """The null condition where ``mask`` [B] (bool) is True, this one elsewhere: condition dropout."""
        out = {}
        if self.labels is not None:
            out["labels"] = torch.where(mask, torch.full_like(self.labels, NULL_LABEL), self.labels)
        if self.image is not None:
            out["image_null"] = mask if self.image_null is None else self.image_null | mask
        if self.token_mask is not None:
            out["token_mask"] = self.token_mask & ~mask[:, None]
        return self.replace(**out)

    def null(self) -> Cond:
        """The null of every kind held, for the same batch (the unconditional term of classifier-free guidance)."""
        some = next(iter(self._fields().values()))
        return self.drop(torch.ones(len(self), dtype=torch.bool, device=some.device))


def image_input(cond: Cond | None, channels: int, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """(the conditioning image resized to x_t's ``size`` [B,channels,H,W], zero where it is null; the null flags
    [B] or None), as a network concatenates it with x_t. A missing or ill-shaped image is a ConfigError."""
    image = None if cond is None else cond.image
    if image is None:
        raise ConfigError(
            f"this model is conditioned on an image ({channels} channels concatenated with x_t): give one, e.g. "
            f"sample.py ... cond.image=<png> or cond.index=<n of the validation split>"
        )
    if image.ndim != 4 or image.shape[1] != channels:
        raise ConfigError(
            f"the conditioning image must be [B,{channels},h,w] ({channels} channels, as the model was trained), "
            f"got {list(image.shape)}"
        )
    if tuple(image.shape[-2:]) != tuple(size):  # SR3: the low-resolution input, bicubic-upsampled to x_t's size
        image = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    null = cond.image_null
    if null is not None:
        image = image * (~null).to(image.dtype)[:, None, None, None]
    return image, null


def placeholder(denoiser, n: int, device=None) -> Cond | None:
    """A stand-in condition for ``n`` inputs of ``denoiser`` (class 0, a zero image), for warm-ups and timing
    probes that run the network without real data; None for an unconditional model."""
    fields = {}
    if getattr(denoiser, "num_classes", None):
        fields["labels"] = torch.zeros(n, dtype=torch.long, device=device)
    channels = getattr(denoiser, "cond_channels", 0)
    if channels:
        fields["image"] = torch.zeros(n, channels, *denoiser.sample_shape[1:], device=device)
    tokenizer = getattr(denoiser, "tokenizer", None)
    if tokenizer is not None:  # the empty caption, at the full context length
        fields["tokens"] = torch.zeros(n, tokenizer.max_length, dtype=torch.long, device=device)
        fields["token_mask"] = torch.zeros(n, tokenizer.max_length, dtype=torch.bool, device=device)
    return Cond(**fields) if fields else None


def text_cond(denoiser, prompts: Sequence[str], device=None) -> Cond:
    """The Cond of ``prompts`` for a text-conditioned ``denoiser``, tokenized by its own tokenizer (a word it never
    saw, or a prompt longer than its context, is a ConfigError naming it; so is a model without text)."""
    tokenizer = getattr(denoiser, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(
            "prompt= needs a text-conditioned model (trained with text_encoder=learned | pooled | clip); this one "
            "has no text encoder"
        )
    tokens, mask = tokenizer(list(prompts))
    return Cond(tokens=tokens.to(device), token_mask=mask.to(device))


class CaptionBank:
    """Every caption of every item key of a text dataset (``captions[key]``: that item's captions), tokenized once:
    tokens [N,K,L] (an item with fewer than K captions repeats them), so a batch's captions are one gather on the
    device, drawn uniformly among the item's own."""

    def __init__(self, captions: Sequence[Sequence[str]], tokenizer):
        if not captions or any(len(c) == 0 for c in captions):
            raise ConfigError("a text dataset must give every item at least one caption")
        K = max(len(c) for c in captions)
        tokens, mask = tokenizer([c[k % len(c)] for c in captions for k in range(K)])
        self.tokens, self.mask = tokens.view(len(captions), K, -1), mask.view(len(captions), K, -1)
        self.count = torch.tensor([len(c) for c in captions])
        self._on: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def draw(self, keys: Tensor, generator: torch.Generator | None = None) -> Cond:
        """The tokens of one caption per key [B], each drawn uniformly among its item's captions."""
        device = str(keys.device)
        if device not in self._on:
            self._on[device] = (self.tokens.to(keys.device), self.mask.to(keys.device), self.count.to(keys.device))
        tokens, mask, count = self._on[device]
        u = torch.rand(keys.shape, device=keys.device, generator=generator)
        k = (u * count[keys]).long().clamp(max=tokens.shape[1] - 1)
        return Cond(tokens=tokens[keys, k], token_mask=mask[keys, k])


# --------------------------------------------------------------------------------------------- image tasks
def downsample(x: Tensor, factor: int) -> Tensor:
    """The low-resolution image of SR: x [B,C,H,W] averaged over factor x factor blocks (area, i.e. a box filter;
    the degradation SR3 and LDM's super-resolution train on is bicubic, which on 8x8 digits loses the same)."""
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ConfigError(
            f"super-resolution by {factor}: the image size {list(x.shape[-2:])} must be a multiple of {factor}"
        )
    return F.avg_pool2d(x, factor)


def upsample_bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The baseline every SR table compares against: bicubic interpolation, clamped to the data range."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


class SuperResolution:
    """Condition on the image downsampled ``factor`` times (SR3's task): cond image = downsample(x0)."""

    name = "sr"
    random = False  # the same image gives the same condition: a latent run may compute it once, with the latents

    def __init__(self, factor: int = 2):
        if int(factor) < 2:
            raise ConfigError(f"task.factor={factor}: super-resolution needs a factor >= 2")
        self.factor = int(factor)

    def channels(self, data_channels: int) -> int:
        return data_channels

    def __call__(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return downsample(x0, self.factor)


class Inpainting:
    """Condition on the masked image and its mask (Palette; Stable Diffusion's inpainting model): cond image =
    [x0 * keep, keep] (C + 1 channels), keep drawn per sample, uniformly among ``masks``: RePaint's mask presets
    (``left_half``, ``centre_square``) and ``random_strokes``, which picks one of a bank of ``num_strokes``
    stroke masks drawn once from ``seed`` (so a batch's masks cost one gather on the device)."""

    name = "inpaint"
    random = True

    def __init__(
        self, masks: Sequence[str] = ("left_half", "centre_square", "random_strokes"), num_strokes: int = 2048,
        seed: int = 0,
    ):  # fmt: skip
        from ddpmlab.samplers.masks import PRESETS

        unknown = [m for m in masks if m not in PRESETS]
        if unknown or not masks:
            raise ConfigError(f"task.masks={list(masks)}: choose masks from {list(PRESETS)}")
        self.mask_names, self.num_strokes, self.seed = list(masks), int(num_strokes), int(seed)
        self._bank: dict[tuple, Tensor] = {}

    def channels(self, data_channels: int) -> int:
        return data_channels + 1

    def bank(self, size: tuple[int, int], device) -> Tensor:
        """Every mask a sample may get, [M,1,H,W]: the fixed presets, then the stroke masks."""
        from ddpmlab.samplers.masks import make_mask

        key = (tuple(size), str(device))
        if key not in self._bank:
            g = torch.Generator().manual_seed(self.seed)
            fixed = [make_mask(m, size) for m in self.mask_names if m != "random_strokes"]
            strokes = [make_mask("random_strokes", size, g) for _ in range(self.num_strokes)]
            strokes = strokes if "random_strokes" in self.mask_names else []
            self._bank[key] = torch.stack(fixed + strokes)[:, None].to(device)
        return self._bank[key]

    def masks(self, n: int, size: tuple[int, int], device, generator: torch.Generator | None) -> Tensor:
        """keep [n,1,H,W] (1 = known pixel): each of ``masks`` equally likely, a stroke mask drawn from the bank."""
        bank = self.bank(size, device)
        num_fixed = len(bank) - (self.num_strokes if "random_strokes" in self.mask_names else 0)
        kind = torch.randint(0, len(self.mask_names), (n,), device=device, generator=generator)
        stroke = num_fixed + torch.randint(0, max(1, self.num_strokes), (n,), device=device, generator=generator)
        return bank[torch.where(kind < num_fixed, kind, stroke.clamp(max=len(bank) - 1))]

    def __call__(self, x0: Tensor, generator: torch.Generator | None = None, keep: Tensor | None = None) -> Tensor:
        if keep is None:
            keep = self.masks(x0.shape[0], tuple(x0.shape[-2:]), x0.device, generator)
        keep = keep.to(x0.dtype).expand(x0.shape[0], 1, *x0.shape[-2:])
        return torch.cat([x0 * keep, keep], dim=1)


def make_task(spec) -> SuperResolution | Inpainting | None:
    """The image task of a ``task`` config ({name: sr, factor: 2} | {name: inpaint, ...} | None)."""
    if not spec:
        return None
    spec = dict(spec)
    name = spec.pop("name", None)
    tasks = {"sr": SuperResolution, "inpaint": Inpainting}
    if name not in tasks:
        raise ConfigError(f"task.name={name!r}: choose one of {sorted(tasks)} (or task=null: no image condition)")
    try:
        return tasks[name](**spec)
    except TypeError as e:
        raise ConfigError(f"task={name}: {e}") from None
