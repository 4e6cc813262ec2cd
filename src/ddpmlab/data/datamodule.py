"""The LightningDataModule: builds a dataset by name and serves (x0 float [B,C,H,W] in [-1, 1], label long [B]).

Two loader paths give batches of the same distribution:
- in-memory datasets (digits, MNIST, Fashion-MNIST, CIFAR-10) on an accelerator: ``DeviceLoader``, the whole
  split as one uint8 tensor on the training device (``on_device: auto``; ``true`` forces it, on CPU too);
- otherwise a DataLoader over the Dataset (items already in [-1, 1]); workers from the CPU count for datasets
  read from files (CelebA, folders), pinned memory on GPU.
Text datasets (digit pairs, captioned folders) serve keys in place of labels: ``dataset.captions[key]`` lists
the item's captions.
Both draw the training order and flips of epoch e from ``seed + e`` alone (data/order.py), so a run resumed
mid-epoch continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ddpmlab.data import datasets as D
from ddpmlab.data.device_loader import DeviceLoader
from ddpmlab.data.files import (
    CaptionedImageFileDataset,
    ImageFileDataset,
    captioned_folder_files,
    celeba_files,
    folder_files,
)
from ddpmlab.data.order import EpochDataLoader, EpochSampler, Flipped, position
from ddpmlab.errors import ConfigError

IN_MEMORY = ("digits", "digit_pairs", "mnist", "fashion_mnist", "cifar10")
FROM_FILES = ("celeba", "folder", "captioned_folder")
DATASETS = IN_MEMORY + FROM_FILES


class DiffusionDataModule(pl.LightningDataModule):
    def __init__(
        self,
        name: str = "digits",
        root: str = "data",
        image_size: int | Sequence[int] = 8,  # [H, W] for digit_pairs (two digits side by side: [8, 16])
        channels: int = 1,
        num_classes: int | None = 10,
        batch_size: int = 128,
        val_fraction: float = 0.1,  # digits and folders: the held-out share (the others have official splits)
        random_flip: bool = False,
        download: bool = False,
        num_workers: int | str = "auto",
        on_device: bool | str = "auto",
        crop: int | None = None,  # centre crop (pixels) before resizing, e.g. 140 for CelebA 64x64
        seed: int = 0,  # the training order and flips of every epoch (data/order.py)
        held_out_pairs: Sequence[Sequence[int]] = D.HELD_OUT_PAIRS,  # digit_pairs: [a, b] pairs never trained on
        num_pairs: int = 20000,  # digit_pairs: training items
        val_pairs_per_pair: int = 10,  # digit_pairs: validation items of each of the 100 pairs
    ):
        super().__init__()
        if name not in DATASETS:
            raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
        image_size = self._check_size(name, image_size)
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3 (grey or RGB), got {channels}")
        if not (isinstance(batch_size, int) and batch_size > 0) or not 0 <= val_fraction < 1:
            raise ConfigError(
                f"data.batch_size must be >= 1 and 0 <= data.val_fraction < 1, got {batch_size} and {val_fraction}"
            )
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ConfigError(f"data.num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
        if on_device not in ("auto", True, False):
            raise ConfigError(f"data.on_device must be auto, true or false, got {on_device!r}")
        if on_device is True and name in FROM_FILES:
            raise ConfigError(
                f"data.on_device=true needs a dataset held in memory ({', '.join(IN_MEMORY)}); "
                f"{name} is read from files"
            )
        if name == "digit_pairs":
            if random_flip:
                raise ConfigError(
                    "data.random_flip=true would mirror digit pairs, putting each digit on the side its caption does "
                    "not say; set data.random_flip=false"
                )
            held_out_pairs = D.check_pairs(held_out_pairs)
            if not (isinstance(num_pairs, int) and num_pairs > 0 and isinstance(val_pairs_per_pair, int)) or (
                val_pairs_per_pair < 0
            ):
                raise ConfigError(
                    f"data.num_pairs must be >= 1 and data.val_pairs_per_pair >= 0, got {num_pairs} "
                    f"and {val_pairs_per_pair}"
                )
        if name == "captioned_folder" and num_classes is not None:
            raise ConfigError(
                f"data.num_classes={num_classes}, but captioned_folder has no classes (its keys index the captions); "
                f"set data.num_classes=null"
            )
        self.held_out_pairs, self.num_pairs, self.val_pairs_per_pair = held_out_pairs, num_pairs, val_pairs_per_pair
        self.name, self.root, self.download = name, root, download
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.batch_size, self.val_fraction, self.random_flip = batch_size, val_fraction, random_flip
        self.num_workers, self.on_device, self.crop, self.seed = num_workers, on_device, crop, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # ------------------------------------------------------------------ building the datasets
    def prepare_data(self) -> None:
        if self.download and self.name in ("mnist", "fashion_mnist", "cifar10", "celeba"):
            D.download(self.name, self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.name == "digit_pairs":
            train, val = D.load_digit_pairs(
                self.val_fraction, self.held_out_pairs, self.num_pairs, self.val_pairs_per_pair
            )
            self.train_set = self._digit_pairs(*train)
            self.val_set = self._digit_pairs(*val) if val is not None else None
        elif self.name in IN_MEMORY:
            self.train_set, self.val_set = (self._in_memory(*split) for split in self._load_in_memory())
        elif self.name == "celeba":
            self.train_set, self.val_set = (self._files(celeba_files(self.root, s)) for s in ("train", "val"))
        elif self.name == "captioned_folder":
            paths, captions = captioned_folder_files(self.root)
            train, val = self._folder_holdout(len(paths))
            self.train_set, self.val_set = (
                CaptionedImageFileDataset(
                    [paths[i] for i in s], [captions[i] for i in s], self.image_size, self.channels
                )
                if len(s)
                else None
                for s in (train, val)
            )
        else:
            paths, labels, _ = folder_files(self.root)
            train, val = self._folder_holdout(len(paths))
            self.train_set = self._files([paths[i] for i in train], labels[train])
            self.val_set = self._files([paths[i] for i in val], labels[val]) if len(val) else None
        self._check_labels(self.train_set.labels)

    @staticmethod
    def _check_size(name: str, image_size) -> int | tuple[int, int]:
        """An integer (square images), or (H, W) for digit_pairs, whose images are twice as wide as high."""
        if name == "digit_pairs":
            if isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2:
                size = tuple(image_size)
                if all(isinstance(v, int) and v > 0 for v in size):
                    return size
            raise ConfigError(
                f"data.image_size for digit_pairs is [H, W], two positive integers (two digits side by side: "
                f"[8, 16]), got {image_size}"
            )
        if not (isinstance(image_size, int) and image_size > 0):
            raise ConfigError(
                f"data.image_size must be a positive integer for {name} (square images; [H, W] is for digit_pairs), "
                f"got {image_size}"
            )
        return image_size

    def _folder_holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        train, val = D.holdout(n, self.val_fraction)
        if len(train) == 0:
            raise ConfigError(
                f"{self.root} holds {n} image(s), all held out for validation; add images or set data.val_fraction=0"
            )
        return train, val

    def _load_in_memory(self):
        if self.name == "digits":
            images, labels = D.load_digits()
            train, val = D.holdout(len(images), self.val_fraction)
            return (images[train], labels[train]), (images[val], labels[val])
        load = D.load_cifar10 if self.name == "cifar10" else lambda root, split: D.load_idx(root, self.name, split)
        return load(self.root, "train"), load(self.root, "val")

    def _in_memory(self, images: torch.Tensor, labels: torch.Tensor) -> D.ImageTensorDataset:
        return D.ImageTensorDataset(self._sized(images), labels)

    def _digit_pairs(self, images: torch.Tensor, keys: torch.Tensor, sources: torch.Tensor) -> D.DigitPairsDataset:
        return D.DigitPairsDataset(self._sized(images), keys, sources, self.held_out_pairs)

    def _sized(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.channels:
            raise ConfigError(f"{self.name} images have {images.shape[1]} channel(s) but data.channels={self.channels}")
        size = (self.image_size,) * 2 if isinstance(self.image_size, int) else self.image_size
        if images.shape[-2:] != size:
            images = D.resize_uint8(images, size)  # once, at load time, e.g. MNIST to 32x32
        return images

    def _files(self, paths, labels=None) -> ImageFileDataset:
        labels = torch.full((len(paths),), D.NO_LABEL) if labels is None else labels
        return ImageFileDataset(paths, labels, self.image_size, self.channels, self.crop)

    def _check_labels(self, labels: torch.Tensor) -> None:
        if (
            self.num_classes is not None
            and len(labels)
            and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes
        ):
            raise ConfigError(
                f"{self.name} labels run from {int(labels.min())} to {int(labels.max())} ({D.NO_LABEL} = no label) "
                f"but data.num_classes={self.num_classes}; set data.num_classes to the number of classes, or null"
            )

    # ------------------------------------------------------------------ loaders
    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _accumulate(self) -> int:
        return getattr(self.trainer, "accumulate_grad_batches", 1)  # a trainer, or what a test gives as one

    def uses_device_loader(self) -> bool:
        if self.name in FROM_FILES:
            return False
        return self._device().type != "cpu" if self.on_device == "auto" else bool(self.on_device)

    def _num_workers(self) -> int:
        if self.num_workers != "auto":
            return self.num_workers
        if self.name in IN_MEMORY:
            return 0  # indexing a tensor in memory: worker processes would only add start-up and copies
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(16, cpus // self._rank()[1] - 1))  # one core per rank for its main process

    def _loader(self, ds: Dataset, train: bool):
        # Training order and flips: a function of (seed, epoch) (data/order.py), so that a resumed run skips the
        # batches it already trained on and then sees what the uninterrupted run saw.
        where = (lambda batches: position(self.trainer, batches)) if train and self.trainer is not None else None
        rank, world_size = self._rank()
        if self.uses_device_loader():
            return DeviceLoader(
                ds.images,
                ds.labels,
                self.batch_size,
                shuffle=train,
                random_flip=train and self.random_flip,
                drop_last=train,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
                accumulate=self._accumulate(),
                device=self._device(),
                position=where,
            )
        workers = self._num_workers()
        common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=self._device().type == "cuda")
        if not train:
            return DataLoader(ds, batch_size=self.batch_size, collate_fn=D.CollateX0(False), **common)
        sampler = EpochSampler(
            len(ds),
            self.batch_size,
            seed=self.seed,
            random_flip=self.random_flip,
            rank=rank,
            world_size=world_size,
            accumulate=self._accumulate(),
            position=where,
        )
        return EpochDataLoader(
            Flipped(ds),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler.num_samples >= self.batch_size,
            collate_fn=D.CollateX0(False),
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: not from torch's global generator
            **common,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False) if self.val_set is not None and len(self.val_set) else []
