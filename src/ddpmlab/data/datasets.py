"""Datasets as uint8 images, read from the files each dataset really ships as.

In-memory datasets (digits, digit pairs, MNIST, Fashion-MNIST, CIFAR-10) load as one uint8 tensor [N,C,H,W]
(``.images``) plus long labels [N] (``.labels``); the on-device path gathers, flips and scales whole batches of it.
Every Dataset yields (x0 float [C,H,W] in [-1, 1], label) per item, unflipped -- what callbacks reading
``datamodule.train_set`` expect -- and the DataLoader path flips per batch in its collate. Labels are class
indices where the dataset has classes and ``NO_LABEL`` (-1) where it has none (CelebA, a folder of images
without class sub-folders). Text datasets label each item with a key into ``dataset.captions``.
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from ddpmlab.data.captions import pair_captions, pair_key, pair_of
from ddpmlab.errors import ConfigError, DatasetNotFoundError
from ddpmlab.images import to_model_range

NO_LABEL = -1
HOLDOUT_SEED = 0  # the same held-out images in every run, whatever the run's seed


def mirror(images: Tensor, flip: Tensor) -> Tensor:
    """[B,C,H,W] with the images where the bool mask ``flip`` [B] is set mirrored left-right."""
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_flip_mask(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Each of ``n`` images flipped with probability 1/2 (the random horizontal flips of DDPM's CIFAR-10 runs)."""
    return torch.rand(n, generator=generator, device=device) < 0.5


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 [N,C,H,W] with long labels [N]; yields (x0 float [C,H,W] in [-1, 1], label)."""

    def __init__(self, images: Tensor, labels: Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 [N,C,H,W]"
        assert labels.shape == images.shape[:1], "one label per image"
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return to_model_range(self.images[i]), self.labels[i]


class CaptionedTensorDataset(ImageTensorDataset):
    """In-memory images whose labels are keys into ``captions``: ``captions[key]`` lists every caption of an item
    (training draws one of them, evaluation prints the first)."""

    def __init__(self, images: Tensor, keys: Tensor, captions: list[list[str]]):
        super().__init__(images, keys)
        self.captions = captions


class CollateX0:
    """DataLoader collate: stack the items, then flip each image with probability 1/2 (torch's global RNG,
    which Lightning's ``seed_everything(workers=True)`` seeds per worker)."""

    def __init__(self, random_flip: bool):
        self.random_flip = random_flip

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x0, labels = default_collate(items)
        if self.random_flip:
            x0 = mirror(x0, random_flip_mask(x0.shape[0]))
        return x0, labels.long()


def holdout(n: int, val_fraction: float) -> tuple[Tensor, Tensor]:
    """Indices (train, val) of a fixed random hold-out of ``val_fraction`` of ``n`` items (at least one)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    return perm[n_val:], perm[:n_val]


def resize_uint8(images: Tensor, image_size: int | tuple[int, int], chunk: int = 4096) -> Tensor:
    """uint8 [N,C,H,W] -> uint8 [N,C,S,S] (or [N,C,h,w] for ``image_size`` (h, w)), antialiased bilinear, in chunks
    to bound the float scratch memory."""
    from torchvision.transforms.v2 import functional as F

    size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    return torch.cat([F.resize(x, size, antialias=True) for x in images.split(chunk)])


# ---------------------------------------------------------------------------------------------- digits
def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16) as uint8 [N,1,8,8]."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(bunch.target).long()


# ---------------------------------------------------------------------------------------------- digit pairs
PAIRS_SEED = 1  # the same pairs, and the same two images in each, in every run, whatever the run's seed
# Never shown in training, to measure composition: each digit once on the left and once on the right, and never a
# pair together with its swap (the 10-cycle 0 -> 7 -> 2 -> 9 -> 4 -> 1 -> 8 -> 3 -> 6 -> 5 -> 0), so every held-out
# pair has a seen partner in the swap test.
HELD_OUT_PAIRS = ((0, 7), (7, 2), (2, 9), (9, 4), (4, 1), (1, 8), (8, 3), (3, 6), (6, 5), (5, 0))


class DigitPairsDataset(CaptionedTensorDataset):
    """Two bundled 8x8 digits side by side, uint8 [N,1,8,16], keyed ``10 * a + b`` (``a`` on the left, ``b`` on the
    right); ``captions[key]`` = ``pair_captions(a, b)`` for all 100 keys. ``sources`` [N,2]: the indices in
    ``load_digits()`` of the left and the right digit; ``held_out``: the keys of the pairs never trained on."""

    pair_of = staticmethod(pair_of)

    def __init__(self, images: Tensor, keys: Tensor, sources: Tensor, held_out_pairs):
        super().__init__(images, keys, [pair_captions(*pair_of(k)) for k in range(100)])
        self.sources = sources
        self.held_out_pairs = [tuple(p) for p in held_out_pairs]
        self.held_out = {pair_key(a, b) for a, b in self.held_out_pairs}
        # The grids' rows: two seen pairs each beside its swap, then the held-out pairs, of those this split holds
        present = set(keys.tolist())
        shown = [pair_key(3, 7), pair_key(7, 3), pair_key(4, 5), pair_key(5, 4)]
        shown += sorted(self.held_out, key=[pair_key(a, b) for a, b in self.held_out_pairs].index)
        self.preview_keys = [k for k in shown if k in present]


def check_pairs(pairs) -> tuple[tuple[int, int], ...]:
    """``data.held_out_pairs`` as a tuple of distinct (a, b), digits 0..9, with at least one pair left to train on."""

    def is_digit(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9

    def is_pair(p) -> bool:
        return not isinstance(p, str) and hasattr(p, "__len__") and len(p) == 2 and all(map(is_digit, p))

    if isinstance(pairs, str) or not hasattr(pairs, "__iter__") or not all(map(is_pair, pairs)):
        raise ConfigError(
            f"data.held_out_pairs must be a list of [a, b] pairs of digits 0..9 (a on the left, b on the right), "
            f"got {pairs}; e.g. data.held_out_pairs=[[0,7],[7,2]]"
        )
    checked = tuple((int(a), int(b)) for a, b in pairs)
    twice = next((p for i, p in enumerate(checked) if p in checked[:i]), None)
    if twice is not None:
        raise ConfigError(f"data.held_out_pairs lists [{twice[0]}, {twice[1]}] twice; list each pair once")
    if len(checked) == 100:
        raise ConfigError("data.held_out_pairs holds out all 100 pairs, leaving none to train on; list fewer")
    return checked


def pair_digits(keys: Tensor, pool: Tensor, labels: Tensor, seed: int) -> Tensor:
    """For each key ``10 * a + b`` a random image of digit ``a`` and one of digit ``b``, drawn from the indices
    ``pool`` of the digits (``labels``: every digit's class): their indices [N,2]."""
    counts = torch.bincount(labels[pool], minlength=10)
    if (counts == 0).any():
        raise ConfigError(
            f"the {len(pool)} digits of this split hold no image of digit {int((counts == 0).nonzero()[0])}; "
            f"raise data.val_fraction"
        )
    by_class = pool[torch.argsort(labels[pool], stable=True)]  # the pool's indices, grouped by digit
    starts = torch.cumsum(counts, 0) - counts
    digits = torch.stack([keys // 10, keys % 10], 1)  # [N,2]: left, right
    u = torch.rand(digits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pick = torch.minimum((u * counts[digits]).long(), counts[digits] - 1)
    return by_class[starts[digits] + pick]


def load_digit_pairs(
    val_fraction: float, held_out_pairs, num_pairs: int, val_pairs_per_pair: int
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor] | None]:
    """(images uint8 [N,1,8,16], keys [N], sources [N,2]) of the train and the val split (None without one).

    Train: ``num_pairs`` pairs, each drawn uniformly over the ordered pairs not held out, of digits from the train
    part of ``holdout`` (the digits data=digits trains on). Val: every one of the 100 pairs ``val_pairs_per_pair``
    times, of the held-out digits, in the order 0..99, 0..99, ... so that any prefix of 100k items holds each pair
    k times (validation may stop after a few batches)."""
    images, labels = load_digits()
    train, val = holdout(len(images), val_fraction)
    held_out = {pair_key(a, b) for a, b in held_out_pairs}
    allowed = torch.tensor([k for k in range(100) if k not in held_out])
    keys = allowed[torch.randint(len(allowed), (num_pairs,), generator=torch.Generator().manual_seed(PAIRS_SEED))]
    splits = [(keys, train)]
    if len(val) and val_pairs_per_pair:
        splits.append((torch.arange(100).repeat(val_pairs_per_pair), val))
    out = []
    for i, (k, pool) in enumerate(splits):
        sources = pair_digits(k, pool, labels, PAIRS_SEED + 1 + i)
        out.append((torch.cat([images[sources[:, 0]], images[sources[:, 1]]], dim=-1), k, sources))
    return out[0], (out[1] if len(out) > 1 else None)


# ---------------------------------------------------------------------------------------------- MNIST-like (IDX)
# torchvision's layout, so that data.download=true (torchvision's downloader) fills the folder we read.
IDX_DATASETS = {  # name: (title, folder under root, where the files come from)
    "mnist": ("MNIST", "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion_mnist": ("Fashion-MNIST", "FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),  # the official test split
}


def read_idx(path: Path) -> Tensor:
    """An IDX file of unsigned bytes (MNIST's format), plain or gzipped as distributed, as a uint8 tensor.

    Read here rather than by torchvision, which takes only unzipped files and cannot say which one is broken."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip: truncated stream or not gzip at all
        raise ConfigError(f"{path} is truncated or corrupt ({e}); delete it and download it again") from e
    ndim = data[3] if len(data) >= 4 else 0
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or ndim == 0 or len(data) != header + math.prod(dims):
        raise ConfigError(
            f"{path} is truncated or corrupt: not an IDX file of {'x'.join(map(str, dims)) or '?'} bytes "
            f"(file holds {len(data)} bytes); delete it and download it again"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(dims)


def idx_dir(root: str | Path, name: str) -> Path:
    return Path(root).expanduser() / IDX_DATASETS[name][1] / "raw"


def load_idx(root: str | Path, name: str, split: str) -> tuple[Tensor, Tensor]:
    """MNIST or Fashion-MNIST ``split`` ('train' | 'val' = the official test set) from
    ``<root>/<MNIST|FashionMNIST>/raw``."""
    title, _, url = IDX_DATASETS[name]
    raw = idx_dir(root, name)
    found = [next((p for p in (raw / f, raw / f"{f}.gz") if p.is_file()), None) for f in IDX_FILES[split]]
    if None in found:
        missing = [f for f, p in zip(IDX_FILES[split], found, strict=True) if p is None]
        raise DatasetNotFoundError(
            f"{title} not found: looked in {raw} for {', '.join(missing)} (plain or .gz). Get the four files "
            f"({', '.join(IDX_FILES['train'] + IDX_FILES['val'])}, each .gz) from {url} into that folder, "
            f"or set data.download=true on a machine with internet"
        )
    images, labels = (read_idx(p) for p in found)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(
            f"{found[0]} ({list(images.shape)}) and {found[1]} ({list(labels.shape)}) do not form a dataset of "
            f"images [N,H,W] with N labels; replace them with the official files"
        )
    return images.unsqueeze(1).contiguous(), labels.long()


# ---------------------------------------------------------------------------------------------- CIFAR-10
# The pickled batches of cifar-10-python.tar.gz, read directly: torchvision's CIFAR10 insists on the md5 of
# every batch and cannot name the file that is broken.
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "val": ("test_batch",)}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle naming a callable outside the allow-list."""


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds -- dicts, lists, strings, numbers and one numpy uint8 array --
    so a crafted batch cannot call anything else (plain ``pickle.load`` would run whatever it names)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles hold bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as fh:
        batch = CifarUnpickler(fh, encoding="latin1").load()  # the batches were pickled by Python 2
    if not isinstance(batch, dict):
        raise ValueError(f"a {type(batch).__name__}, not a dict of data and labels")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar10(root: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """CIFAR-10 ``split`` ('train' | 'val' = the official test batch) as uint8 [N,3,32,32] + labels."""
    folder = Path(root).expanduser() / CIFAR10_DIR
    missing = [f for f in CIFAR10_FILES[split] if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: looked in {folder} for {', '.join(missing)}. Download {CIFAR10_URL} and "
            f"extract it in {folder.parent} (tar xzf cifar-10-python.tar.gz), or set data.download=true"
        )
    images, labels = [], []
    for f in CIFAR10_FILES[split]:
        path = folder / f
        try:
            batch = read_cifar_batch(path)
            x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch["labels"], dtype=np.int64)
            if len(x) != len(y):
                raise ValueError(f"{len(x)} images but {len(y)} labels")
        except RefusedGlobal as e:
            raise ConfigError(
                f"{path} is not a CIFAR-10 batch: it asks to call {e}, which was refused (a batch "
                f"holds only arrays and lists); extract the batches again from {CIFAR10_URL}"
            ) from e
        except Exception as e:  # any other unpickling or layout failure means the same thing: a broken file
            raise ConfigError(
                f"{path} is truncated or corrupt ({type(e).__name__}: {e}); extract it again from {CIFAR10_URL}"
            ) from e
        images.append(torch.from_numpy(x))
        labels.append(torch.from_numpy(y))
    return torch.cat(images), torch.cat(labels)


# ---------------------------------------------------------------------------------------------- downloads
def download(name: str, root: str | Path) -> None:
    """Fetch a dataset with torchvision's downloader into the layout the loaders read (needs internet)."""
    from torchvision import datasets as tv

    root = str(Path(root).expanduser())
    try:
        if name in IDX_DATASETS:
            cls = tv.MNIST if name == "mnist" else tv.FashionMNIST
            cls(root, train=True, download=True), cls(root, train=False, download=True)
        elif name == "cifar10":
            tv.CIFAR10(root, train=True, download=True)
        elif name == "celeba":
            tv.CelebA(root, split="all", target_type=[], download=True)
    except Exception as e:  # no network, a moved mirror, a Google Drive quota, a failed checksum
        raise DatasetNotFoundError(
            f"could not download {name} into {root} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            f"set data.download=false and put the files there by hand (the error without download says which)"
        ) from e
