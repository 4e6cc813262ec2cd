"""Inpainting masks, in RePaint's convention (Lugmayr et al. 2022, "gt_keep_mask"): ``keep`` float [H,W],
1 where the pixel is known (kept from the original), 0 where it is to be inpainted.

A preset names the hole: ``left_half`` (columns 0..W/2-1 unknown), ``centre_square`` (a centred square of side
H/2 unknown), ``random_strokes`` (a few thick random brush strokes unknown, reproducible from a generator).
A mask file is a grey-scale image, white (>= 128) = known, black = to inpaint, resized nearest-neighbour.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ddpmlab.errors import ConfigError
from ddpmlab.fileio import read_image

PRESETS = ("left_half", "centre_square", "random_strokes")


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    if H < 2 or W < 2:
        raise ConfigError(f"a mask needs an image of at least 2x2 pixels, got {H}x{W}")
    return H, W


def left_half(size: int | tuple[int, int]) -> Tensor:
    """The left half unknown (columns 0..W//2-1), the right half known."""
    H, W = _hw(size)
    keep = torch.ones(H, W)
    keep[:, : W // 2] = 0
    return keep


def centre_square(size: int | tuple[int, int]) -> Tensor:
    """A centred square hole of side min(H, W) // 2; everything around it known."""
    H, W = _hw(size)
    side = min(H, W) // 2
    top, left = (H - side) // 2, (W - side) // 2
    keep = torch.ones(H, W)
    keep[top : top + side, left : left + side] = 0
    return keep


def random_strokes(
    size: int | tuple[int, int], generator: torch.Generator | None = None, num_strokes: int = 3, num_segments: int = 4
) -> Tensor:
    """``num_strokes`` thick brush strokes unknown (free-form masks, as in the RePaint and LaMa evaluations):
    each a polyline of ``num_segments`` segments of length ~ size/4, turning at random, with a brush radius of
    max(0.75, size/12) pixels. About a third of the image is unknown on average (15-50% per draw)."""
    H, W = _hw(size)
    scale = min(H, W)
    radius = max(0.75, scale / 12)
    u = lambda *shape: torch.rand(shape, generator=generator)
    points = []
    for _ in range(num_strokes):
        p = u(2) * torch.tensor([H - 1.0, W - 1.0])
        angle = float(u(1)) * 2 * math.pi
        for _ in range(num_segments):
            angle += (float(u(1)) - 0.5) * math.pi  # turn by up to +-90 degrees
            length = scale / 4 * (0.5 + float(u(1)))
            q = (p + length * torch.tensor([math.sin(angle), math.cos(angle)])).clamp(
                torch.zeros(2), torch.tensor([H - 1.0, W - 1.0])
            )
            n = max(2, math.ceil(float((q - p).norm()) * 2))  # a point every half pixel along the segment
            points.append(p + torch.linspace(0, 1, n)[:, None] * (q - p))
            p = q
    pts = torch.cat(points)  # [P,2]
    rows, cols = torch.meshgrid(
        torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij"
    )
    d2 = (rows[None] - pts[:, 0, None, None]) ** 2 + (cols[None] - pts[:, 1, None, None]) ** 2  # [P,H,W]
    return (d2.min(0).values > radius**2).float()


def load_mask(path: str | Path, size: int | tuple[int, int]) -> Tensor:
    """A mask image file (PNG, JPEG, ...): grey level >= 128 known, < 128 to inpaint; resized nearest-neighbour."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import pil_to_tensor, resize

    grey = pil_to_tensor(read_image(path, "L", "the mask image"))  # uint8 [1,h,w]
    H, W = _hw(size)
    grey = resize(grey, [H, W], interpolation=InterpolationMode.NEAREST)
    return (grey[0] >= 128).float()


def make_mask(spec: str, size: int | tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """``keep`` [H,W] from a preset name or a mask file path; refuses a mask with nothing to inpaint."""
    if spec in PRESETS:
        keep = (
            random_strokes(size, generator)
            if spec == "random_strokes"
            else {"left_half": left_half, "centre_square": centre_square}[spec](size)
        )
    elif Path(str(spec)).expanduser().is_file():
        keep = load_mask(spec, size)
    else:
        raise ConfigError(f"mask {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an image file")
    if bool(keep.all()):
        raise ConfigError(
            f"mask {spec!r} keeps every pixel, so there is nothing to inpaint (white = known, black = to inpaint)"
        )
    return keep
