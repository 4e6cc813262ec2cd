"""Image grids for people to look at: small images (8x8 digits) are enlarged with nearest-neighbour
so a saved PNG or a dashboard panel is readable; pixel values are never interpolated."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image


def image_grid(images: torch.Tensor, nrow: int | None = None, min_cell: int = 32) -> torch.Tensor:
    """[N,C,H,W] in [0, 1] -> one [C,H',W'] grid; each image upscaled by an integer factor to >= min_cell px."""
    scale = max(1, math.ceil(min_cell / images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_cell: int = 32) -> torch.Tensor:
    grid = image_grid(images, nrow, min_cell)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid
