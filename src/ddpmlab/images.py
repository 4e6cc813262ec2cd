"""Images in and out: the conversions between the model's range [-1, 1], [0, 1] and uint8 (all here, the
data's own scaling included), reading an image file, and grids for people to look at: small images (8x8 digits)
are enlarged with nearest-neighbour so a saved PNG or a dashboard panel is readable; pixel values are never
interpolated. A text model's grids write each row's caption under it (:func:`caption_grid`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from ddpmlab.fileio import atomic_path, read_image

__all__ = [
    "caption_grid",
    "image_grid",
    "load_image",
    "save_grid",
    "side_by_side",
    "to_hwc_uint8",
    "to_model_range",
    "to_uint8",
    "to_unit",
]


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (DDPM Sec. 3.3: data scaled linearly to [-1, 1])."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest of the 256 levels."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> float [0, 1] (clamped), for grids and loggers."""
    return (images.float().clamp(-1, 1) + 1) / 2


def to_hwc_uint8(images: torch.Tensor):
    """[N,C,H,W] in [-1, 1] -> a uint8 numpy array [N,H,W,C], as samples.npz stores them."""
    return to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()


def load_image(path: str | Path, channels: int, size: int, what: str = "image") -> torch.Tensor:
    """An image file as [1,C,size,size] in [-1, 1] (antialiased resize; grey or RGB as ``channels``), decoded by
    PIL (:func:`ddpmlab.fileio.read_image`). ``what`` names the setting in error messages (e.g. ``inpaint.image``)."""
    from torchvision.transforms.v2.functional import pil_to_tensor, resize

    img = pil_to_tensor(read_image(path, "L" if channels == 1 else "RGB", what))
    return to_model_range(resize(img, [size, size], antialias=True))[None]


def side_by_side(x0: torch.Tensor, keep: torch.Tensor, completions: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Rows of [masked input (unknown pixels mid-grey) | up to ``per_row`` completions | original], in [0, 1]."""
    masked = to_unit(x0 * keep)  # unknown pixels at 0 in [-1, 1]: mid-grey
    original = to_unit(x0)
    shown = to_unit(completions)
    rows = []
    for lo in range(0, len(shown), per_row):
        chunk = shown[lo : lo + per_row]
        pad = torch.ones(per_row - len(chunk), *chunk.shape[1:]) if lo else chunk[:0]
        rows.append(torch.cat([masked, chunk, pad, original]))
    return torch.cat(rows)


def cond_rows(
    inputs: torch.Tensor | None, samples: torch.Tensor, originals: torch.Tensor | None = None, n: int | None = None
) -> torch.Tensor:
    """Rows of [input | its samples | original (when known)] in [0, 1], for N inputs [N,C',h,w] (a conditioning
    image: its first C channels, nearest-upsampled to the samples' size, so a low-resolution input shows its
    pixels; None: no input column, e.g. a caption, and ``n`` rows), N*K samples [N*K,C,H,W] (K per input,
    consecutive) and N originals [N,C,H,W]; every row 1+K(+1) wide."""
    n, (C, H, W) = (n if inputs is None else inputs.shape[0]), samples.shape[1:]
    per = samples.shape[0] // n
    rows = [to_unit(samples).unflatten(0, (n, per))]
    if inputs is not None:
        rows.insert(0, to_unit(F.interpolate(inputs[:, :C].float(), size=(H, W), mode="nearest"))[:, None])
    if originals is not None:
        rows.append(to_unit(originals)[:, None])
    return torch.cat(rows, dim=1).flatten(0, 1)


def image_grid(images: torch.Tensor, nrow: int | None = None, min_cell: int = 32) -> torch.Tensor:
    """[N,C,H,W] in [0, 1] -> one [C,H',W'] grid; each image upscaled by an integer factor to >= min_cell px."""
    scale = max(1, math.ceil(min_cell / min(images.shape[-2:])))
    if scale > 1:
        images = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def caption_grid(images: torch.Tensor, captions: Sequence[str], per_row: int, min_cell: int = 32) -> torch.Tensor:
    """Rows of ``per_row`` images [len(captions) * per_row, C, H, W] in [0, 1], each row's caption written under it
    on a white strip: one [C,H',W'] image in [0, 1]. The rows are :func:`image_grid`'s (upscaled to >= ``min_cell``
    px); the captions are drawn at a size that follows the upscaled cells, wrapped to the row's width, and every
    strip is as tall as the longest caption needs, so the rows stay evenly spaced."""
    n = len(captions)
    if per_row < 1 or images.shape[0] != n * per_row:
        raise ValueError(f"{images.shape[0]} images do not make {n} rows of {per_row}")
    rows = [image_grid(images[i * per_row : (i + 1) * per_row], nrow=per_row, min_cell=min_cell) for i in range(n)]
    C, _, W = rows[0].shape
    font = caption_font(size=min(24, max(10, round(0.45 * rows[0].shape[1]))))  # about half a cell high
    lines = [wrap_caption(c, font, W - 8) for c in captions]
    line_height = text_size("Ag", font)[1] + 2
    strip = 4 + line_height * max(len(ls) for ls in lines)
    out = []
    for row, text in zip(rows, lines, strict=True):
        out += [row, text_strip(text, font, W, strip, line_height).to(row).expand(C, -1, -1)]
    return torch.cat(out, dim=1)


def caption_font(size: int):
    """PIL's default font at ``size`` px (Pillow >= 10.1 with FreeType), else its fixed-size bitmap default."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an older Pillow, or one built without FreeType
        return ImageFont.load_default()


def wrap_caption(caption: str, font, width: int) -> list[str]:
    """``caption`` broken at spaces into lines no wider than ``width`` px (a single long word stays whole)."""
    words = str(caption).split() or ["(empty", "caption)"]  # the null condition: say so rather than draw nothing
    lines = [words[0]]
    for word in words[1:]:
        wider = f"{lines[-1]} {word}"
        if text_size(wider, font)[0] <= width:
            lines[-1] = wider
        else:
            lines.append(word)
    return lines


def text_size(text: str, font) -> tuple[int, int]:
    """(width, height) in px of ``text`` drawn with ``font`` from the origin (ImageDraw's own measure)."""
    from PIL import Image, ImageDraw

    _, _, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    return right, bottom


def text_strip(lines: list[str], font, width: int, height: int, line_height: int) -> torch.Tensor:
    """A white [1,height,width] strip in [0, 1] with ``lines`` in black, centred, one under the other."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        x = max(0, (width - text_size(line, font)[0]) // 2)
        draw.text((x, 2 + i * line_height), line, fill=0, font=font)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(1, height, width).float() / 255


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_cell: int = 32) -> torch.Tensor:
    """:func:`image_grid` written to ``path`` (PNG) atomically: the old file or the whole new one, never a part."""
    grid = image_grid(images, nrow, min_cell)
    save_png(grid, path)
    return grid


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """One [C,H,W] image in [0, 1] written to ``path`` atomically (torchvision's ``save_image`` into a temporary
    file beside it, renamed over it)."""
    with atomic_path(path) as tmp:
        save_image(image, tmp)
