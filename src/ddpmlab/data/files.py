"""Datasets too large for memory, read image by image: CelebA (official layout), any folder of images, and a
folder of images with a caption file beside each."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as F

from ddpmlab.data.datasets import NO_LABEL
from ddpmlab.errors import ConfigError, DatasetNotFoundError
from ddpmlab.fileio import read_image
from ddpmlab.images import to_model_range


class ImageFileDataset(Dataset):
    """Image files -> (x0 float [C,H,W] in [-1, 1], label): optionally centre-cropped to ``crop`` first, then resized
    so the shorter side is ``image_size`` and centre-cropped to a square. ``channels`` 1 reads grey, 3 reads RGB."""

    def __init__(self, paths: list[Path], labels: Tensor, image_size: int, channels: int, crop: int | None = None):
        assert len(paths) == len(labels), "one label per image"
        self.paths, self.labels = list(paths), labels.long()
        self.image_size, self.mode, self.crop = image_size, {1: "L", 3: "RGB"}[channels], crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path = self.paths[i]
        img = read_image(path, self.mode, fix="replace or remove that file")  # a truncated file fails here
        if self.crop:
            img = F.center_crop(img, [self.crop])
        img = F.center_crop(F.resize(img, [self.image_size]), [self.image_size])
        return to_model_range(F.pil_to_tensor(img)), self.labels[i]


class CaptionedImageFileDataset(ImageFileDataset):
    """Image files keyed by their index: yields (x0, index), and ``captions[index]`` lists the image's captions."""

    def __init__(self, paths: list[Path], captions: list[list[str]], image_size: int, channels: int):
        assert len(paths) == len(captions), "captions for every image"
        super().__init__(paths, torch.arange(len(paths)), image_size, channels)
        self.captions = captions


# ---------------------------------------------------------------------------------------------- CelebA
# torchvision's layout (<root>/celeba/...), read directly: torchvision's CelebA checks the md5 of five
# annotation files when training needs only the images and the official split.
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}  # list_eval_partition.txt: 0 train, 1 valid, 2 test


def celeba_files(root: str | Path, split: str) -> list[Path]:
    """The aligned-and-cropped CelebA images of the official ``split`` ('train' | 'val' | 'test')."""
    base = Path(root).expanduser() / "celeba"
    partition, folder = base / "list_eval_partition.txt", base / "img_align_celeba"
    missing = [p.name for p in (partition, folder) if not p.exists()]
    if missing:
        raise DatasetNotFoundError(
            f"CelebA not found: looked in {base} for {' and '.join(missing)} (list_eval_partition.txt and the folder "
            f"img_align_celeba/ of 202,599 JPEGs). Download 'Align&Cropped Images' (img_align_celeba.zip) and "
            f"list_eval_partition.txt from {CELEBA_URL}, unzip the images into {base}, or set data.download=true"
        )
    names = []
    for n, line in enumerate(partition.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ConfigError(f"{partition} line {n} is not '<image> <0|1|2>': {line[:80]!r}; download it again")
        if int(fields[1]) == CELEBA_SPLITS[split]:
            names.append(fields[0])
    if not names:
        raise ConfigError(f"{partition} lists no images for the {split} split; download it again")
    present = set(os.listdir(folder))
    absent = [name for name in names if name not in present]
    if absent:
        raise DatasetNotFoundError(
            f"{len(absent)} of the {len(names)} CelebA {split} images listed in {partition} are missing from "
            f"{folder} (first: {absent[0]}); unzip img_align_celeba.zip there again"
        )
    return [folder / name for name in names]


# ---------------------------------------------------------------------------------------------- folders
def folder_files(root: str | Path) -> tuple[list[Path], Tensor, list[str]]:
    """Every image PIL can open under ``root`` (any depth; hidden files skipped), sorted, with labels as
    torchvision's ImageFolder gives them -- the index of the top-level sub-folder -- when every image lies in
    one, else ``NO_LABEL``. Returns (paths, labels [N], class names)."""
    root = Path(root).expanduser()
    paths = list_images(root)
    check_images(paths)
    tops = [p.relative_to(root).parts for p in paths]
    if all(len(parts) > 1 for parts in tops):
        classes = sorted({parts[0] for parts in tops})
        index = {c: i for i, c in enumerate(classes)}
        return paths, torch.tensor([index[parts[0]] for parts in tops]), classes
    return paths, torch.full((len(paths),), NO_LABEL), []


def list_images(root: Path) -> list[Path]:
    """The image files under ``root`` (any depth, hidden files skipped), sorted; at least one."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist; set data.root to a directory of images")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS
        and not any(s.startswith(".") for s in p.relative_to(root).parts)
        and p.is_file()
    )
    if not paths:
        raise ConfigError(f"no images in {root}: expected files ending in {' '.join(IMG_EXTENSIONS)} anywhere under it")
    return paths


def captioned_folder_files(root: str | Path) -> tuple[list[Path], list[list[str]]]:
    """Every image under ``root`` (as ``folder_files``) with its captions, read from the ``.txt`` file of the same
    name beside it (``img_001.png`` + ``img_001.txt``, the layout of common text-image datasets): each non-empty
    line, stripped, is one caption. Captions are checked before the images are decoded, the cheaper check first."""
    root = Path(root).expanduser()
    paths = list_images(root)
    texts = [p.with_suffix(".txt") for p in paths]
    missing = [p for p, t in zip(paths, texts, strict=True) if not t.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} of the {len(paths)} images under {root} have no caption file beside them (first: "
            f"{missing[0]}, no {missing[0].with_suffix('.txt').name}); write each image's caption into a .txt file "
            f"of the same name beside it, or remove the images without one"
        )
    captions = []
    for t in texts:
        try:
            text = t.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read caption file {t} ({str(e)[:200]}); write it again as UTF-8 text") from e
        captions.append([line.strip() for line in text.splitlines() if line.strip()])
    empty = [t for t, c in zip(texts, captions, strict=True) if not c]
    if empty:
        raise ConfigError(
            f"{len(empty)} of the {len(texts)} caption files under {root} are empty (first: {empty[0]}); write the "
            f"image's caption into it, or remove the image"
        )
    check_images(paths)
    return paths, captions


def check_images(paths: list[Path]) -> None:
    """Decode every image once, before training: a truncated or corrupt file is one line now, not a failure at
    whichever step first draws it. JPEGs are decoded in PIL's draft mode (at 1/8 scale), which still reads every
    byte of the file but skips most of the work."""
    for path in paths:
        read_image(path, "RGB", what="image", fix="replace or remove that file", draft=True)
