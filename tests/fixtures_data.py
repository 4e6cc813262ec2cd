"""Tiny datasets written in each dataset's real on-disk format (IDX, pickled CIFAR batches, CelebA's layout,
image folders), and helpers that read batches back, for the data tests and for manual CLI runs:

    python tests/fixtures_data.py /tmp/tiny_data    # writes every dataset under that root
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpmlab.data import to_uint8


def images_with_ids(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n,C,H,W] random images, image i carrying its index in pixels (0,0..1) of channel 0 and a
    bright marker at the left edge (0,0,2) -- so a test can tell which image a batch row came from and whether
    it was mirrored."""
    x = np.random.default_rng(seed).integers(0, 200, (n, channels, size, size), dtype=np.uint8)
    ids = np.arange(n)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids // 256, ids % 256
    x[:, 0, 0, 2], x[:, 0, 0, size - 3] = 255, 0  # the marker, and its mirror position kept dark
    x[:, 0, 0, size - 1], x[:, 0, 0, size - 2] = 0, 0
    return x


def write_idx(path: Path, array: np.ndarray) -> Path:
    """IDX of unsigned bytes (magic 0x0000 08 <ndim>, big-endian dims), gzipped when the name ends in .gz."""
    data = (
        bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(data)
    return path


def make_idx_dataset(root: Path, folder: str = "MNIST", n_train: int = 64, n_val: int = 16, gz: bool = True) -> Path:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], 28x28 grey, labels id % 10."""
    raw = Path(root) / folder / "raw"
    ext = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_val, 1)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", images_with_ids(n, 1, 28, seed)[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return raw


def make_cifar10(root: Path, per_batch: int = 8, n_val: int = 8) -> Path:
    """<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}: dicts of data [n,3072] uint8
    (channel-major rows) and labels, as in cifar-10-python.tar.gz; the train ids run across the five batches."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = images_with_ids(5 * per_batch, 3, 32, 0)
    parts = [(f"data_batch_{i + 1}", train[i * per_batch : (i + 1) * per_batch], i * per_batch) for i in range(5)]
    for name, x, first in parts + [("test_batch", images_with_ids(n_val, 3, 32, 1), 0)]:
        ids = np.arange(first, first + len(x))
        batch = {
            "batch_label": name,
            "labels": [int(i % 10) for i in ids],
            "data": x.reshape(len(x), -1),
            "filenames": [f"img_{i}.png" for i in ids],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
        pickle.dump(meta, f, protocol=2)
    return folder


def make_celeba(root: Path, counts: tuple[int, int, int] = (12, 4, 4)) -> Path:
    """<root>/celeba/img_align_celeba/000001.jpg ... (178x218 RGB JPEG, as the aligned faces) and
    list_eval_partition.txt ('<file> <0|1|2>' per line). The central 140x140 is one colour per split
    (train red, valid green, test blue) with a white band on its left: a test can check crop, split and flips."""
    base = Path(root) / "celeba"
    (base / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    lines, k = [], 0
    for part, n in enumerate(counts):
        for _ in range(n):
            k += 1
            img = np.zeros((218, 178, 3), np.uint8)  # outside the 140 crop: black
            top, left = (218 - 140) // 2, (178 - 140) // 2
            img[top : top + 140, left : left + 140] = colours[part]
            img[top : top + 140, left : left + 30] = 255
            Image.fromarray(img).save(base / "img_align_celeba" / f"{k:06d}.jpg", quality=95)
            lines.append(f"{k:06d}.jpg {part}")
    (base / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return base


def make_folder(root: Path, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 6) -> Path:
    """<root>/<class>/img_<i>.{png,jpg}: JPEG (RGB, L) and PNG (RGBA, P) files of varied sizes."""
    root = Path(root)
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            mode, ext = (("RGB", "jpg"), ("RGBA", "png"), ("L", "jpg"), ("P", "png"))[i % 4]
            img.convert(mode).save(root / c / f"img_{i}.{ext}")
    return root


# ---------------------------------------------------------------------------------------------- reading batches
def datamodule(name: str, root: Path, *overrides: str):
    """The data module exactly as ``python train.py data=<name> data.root=<root> ...`` builds it, set up."""
    from hydra.utils import instantiate

    from conftest import compose_cfg

    dm = instantiate(compose_cfg("train", [f"data={name}", f"data.root={root}", *overrides]).data)
    dm.setup("fit")
    return dm


def decode(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image ids [B], mirrored [B]) of a batch of images written by ``images_with_ids``."""
    row = to_uint8(x0)[:, 0, 0]  # [B, W]
    flipped = row[:, -3] == 255
    assert ((row[:, 2] == 255) ^ flipped).all(), "every image carries its marker on exactly one side"
    row = torch.where(flipped[:, None], row.flip(-1), row).long()
    return row[:, 0] * 256 + row[:, 1], flipped


def one_epoch(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All batches of one pass over ``loader``: (x0, labels, image ids, mirrored)."""
    xs, ys = zip(*loader, strict=True)
    x0, y = torch.cat(xs), torch.cat(ys)
    ids, flipped = decode(x0)
    return x0, y, ids, flipped


def assert_model_range(x0: torch.Tensor) -> None:
    assert x0.dtype == torch.float32 and x0.min() >= -1 and x0.max() <= 1
    levels = (x0 + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4), "x0 = uint8 / 127.5 - 1: on the 256-level grid"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ddpmlab_tiny_data")
    make_idx_dataset(out, "MNIST", 512, 64)
    make_idx_dataset(out, "FashionMNIST", 512, 64)
    make_cifar10(out, per_batch=100, n_val=50)
    make_celeba(out, (64, 16, 16))
    make_folder(out / "images", per_class=32)
    print(out)
