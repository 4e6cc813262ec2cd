"""The data of a latent-diffusion run: a DiffusionDataModule wrapped so that the second stage sees latents
z = s * E(x) of its frozen first stage (LDM), encoded once per split or per batch, resuming mid-epoch exactly."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import Tensor

from ddpmlab.data.order import ResumesAtStep, batch_seed, epoch_order, position, shard
from ddpmlab.diffusion.latent import LatentDenoiser
from ddpmlab.errors import ConfigError
from ddpmlab.images import to_model_range
from ddpmlab.seeding import shard_index

ENCODE_MODES = ("auto", "once", "per_batch")


def _pixels(dataset, batch_size: int):
    """Batches of x0 [B,C,H,W] in [-1, 1] over a split in order (in-memory tensors or any Dataset)."""
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor) and images.dtype == torch.uint8:
        for start in range(0, images.shape[0], batch_size):
            yield to_model_range(images[start : start + batch_size])
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        yield batch[0]


@torch.no_grad()
def encode_split(
    denoiser: LatentDenoiser, dataset, device: torch.device, batch_size: int = 256, limit: int | None = None,
    task=None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """The unscaled latent moments (mean, std) of a split's first ``limit`` images, on ``device``; with an image
    ``task`` (super-resolution), also each image's condition computed from its pixels (the low-resolution image)."""
    means, stds, images, n = [], [], [], 0
    for x in _pixels(dataset, batch_size):
        x = x.to(device)
        mean, std = denoiser.moments(x)
        means.append(mean)
        stds.append(std)
        if task is not None:
            images.append(task(x))
        n += x.shape[0]
        if limit is not None and n >= limit:
            break
    out = [torch.cat(means), torch.cat(stds)] + ([torch.cat(images)] if task is not None else [])
    return tuple(o[:limit] for o in out) if limit is not None else tuple(out)


class LatentLoader(ResumesAtStep):
    """(z [B,c,h,w], label [B][, cond image]) batches from latent moments held on one device (and the conditioning
    images of an image task, computed from the pixels), with a fresh posterior sample
    z = s * (mean + std * eps) every batch, like encoding each batch anew. Training (``train``): each epoch in the
    order and rank shard of data/order.py, from the first batch not yet trained on (``position``), eps of a batch
    seeded by its place in that order, so a resumed run draws what the uninterrupted run drew. Validation: the
    split in order, the same eps at every pass."""

    def __init__(
        self,
        denoiser: LatentDenoiser,
        mean: Tensor,
        std: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
        position: Callable[[int], tuple[int, int] | None] | None = None,
        images: Tensor | None = None,
    ):
        self.denoiser, self.mean, self.std, self.labels = denoiser, mean, std, labels.to(mean.device)
        self.images = images
        self.batch_size, self.train, self.seed, self.rank, self.world_size = batch_size, train, seed, rank, world_size
        self.accumulate = accumulate if train else 1
        n = mean.shape[0]
        # Training shards are cut to equal length so that every rank runs the same number of steps.
        self.shard_size = len(shard(torch.arange(n), batch_size, rank, world_size, accumulate)) if train else n
        self.drop_last = train and self.shard_size >= batch_size
        self.epoch, self.position = 0, position

    def __len__(self) -> int:
        return self.shard_size // self.batch_size if self.drop_last else math.ceil(self.shard_size / self.batch_size)

    def __iter__(self):
        where = self.position(len(self)) if self.position is not None else None
        epoch, skip = where if where is not None else (self.epoch, 0)
        self.epoch = epoch + 1  # plain iteration (no Lightning) gets a fresh order every pass
        device = self.mean.device
        if self.train:
            order, _ = epoch_order(self.mean.shape[0], self.seed, epoch, True, False, device)
            mine = shard(order, self.batch_size, self.rank, self.world_size, self.accumulate)
        else:
            mine, epoch = torch.arange(self.shard_size, device=device), 0
        split = "train" if self.train else "val"
        for b in range(skip, len(self)):
            i = mine[b * self.batch_size : (b + 1) * self.batch_size]
            step, micro = divmod(b, self.accumulate)  # the seed of the micro-batch, not of the rank: data/order.py
            where = shard_index(self.rank, self.world_size, micro)
            g = torch.Generator(device).manual_seed(batch_seed(self.seed, where, epoch, step, split))
            z = self.denoiser.scaled_sample(self.mean[i], self.std[i], g)
            yield (z, self.labels[i]) if self.images is None else (z, self.labels[i], self.images[i])


class SeededBatches(ResumesAtStep):
    """``encode="per_batch"``: the pixel loader's batches (x, y), each with the seed of its posterior sample
    (data/order.py's ``batch_seed`` of its place in the epoch) as a third element, so the sample drawn after the
    batch reaches the device does not depend on what the process drew before. The pixel loader itself skips the
    batches already trained on; this counts from the same ``position``."""

    def __init__(self, loader, *, train: bool, seed: int, rank: int = 0, position=None):
        self.loader, self.train, self.seed, self.rank, self.position = loader, train, seed, rank, position
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        where = self.position(len(self)) if self.position is not None else None
        epoch, skip = where if where is not None else (self.epoch, 0)
        self.epoch = epoch + 1
        epoch, split = (epoch, "train") if self.train else (0, "val")  # validation: the same draws every pass
        for b, (x, y) in enumerate(self.loader, start=skip):
            yield x, y, batch_seed(self.seed, self.rank, epoch, b, split)


class LatentDataModule(pl.LightningDataModule):
    """Wraps a DiffusionDataModule so the second stage sees latents z = s * E(x) of the frozen first stage:
    ``encode="once"`` encodes each split once on the training device and keeps its moments there;
    ``"per_batch"`` encodes every batch after it reaches the device. Both resume mid-epoch exactly (data/order.py).
    Anything else goes to the wrapped module."""

    def __init__(
        self, data: pl.LightningDataModule, denoiser: LatentDenoiser, encode: str = "once", seed: int = 0, task=None
    ):
        super().__init__()
        self.data, self.denoiser, self.encode, self.seed = data, denoiser, encode, seed
        if task is not None and task.random:
            raise ConfigError(
                f"task={task.name} draws its condition from the pixels at every step, which a latent run does not "
                "see: train it in pixel space (experiment=inpaint_digits), or use task=sr on latents"
            )
        self.task = task  # super-resolution: the low-resolution image, computed once from the pixels
        self.encode_seconds = 0.0

    def __getattr__(self, name: str):
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        # Lightning attaches its trainer to this module only; the wrapped one's loaders ask it for the training
        # device, the rank and where a resumed run stands (per_batch).
        self.data.trainer = self.trainer
        self.data.setup(stage)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _position(self, train: bool):
        return (lambda batches: position(self.trainer, batches)) if train and self.trainer is not None else None

    def _once(self, dataset, train: bool) -> LatentLoader:
        start = time.perf_counter()
        limit = None if train or self.trainer is None else self.trainer.limit_val_batches
        limit = limit * self.data.batch_size if isinstance(limit, int) else None  # only the batches validation uses
        mean, std, *images = encode_split(self.denoiser, dataset, self._device(), limit=limit, task=self.task)
        seconds = time.perf_counter() - start
        self.encode_seconds += seconds
        if train:
            print(f"latent diffusion: encoded {len(mean)} training images once in {seconds:.1f}s", flush=True)
        rank, world_size = self._rank() if train else (0, 1)
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1) if train else 1
        return LatentLoader(
            self.denoiser,
            mean,
            std,
            dataset.labels[: len(mean)],
            self.data.batch_size,
            train=train,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            accumulate=accumulate,
            position=self._position(train),
            images=images[0] if images else None,
        )

    def _per_batch(self, loader, train: bool) -> SeededBatches:
        return SeededBatches(loader, train=train, seed=self.seed, rank=self._rank()[0], position=self._position(train))

    def train_dataloader(self):
        if self.encode == "once":
            return self._once(self.data.train_set, True)
        return self._per_batch(self.data.train_dataloader(), True)

    def val_dataloader(self):
        val = self.data.val_set
        if val is None or not len(val):
            return []
        return self._once(val, False) if self.encode == "once" else self._per_batch(self.data.val_dataloader(), False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.encode != "per_batch":
            return batch
        x, y, seed = batch
        z = self.denoiser.encode(x, torch.Generator(x.device).manual_seed(seed))
        return (z, y) if self.task is None else (z, y, self.task(x))


def encode_mode(cfg, num_train: int) -> str:
    """``first_stage.encode``; auto: once when the run sees at least one epoch of images (then each image is
    encoded once instead of every time it is drawn), else per batch (the up-front pass would cost more)."""
    mode = cfg.first_stage.get("encode", "auto")
    if mode != "auto":
        return mode
    return "once" if cfg.trainer.max_steps * cfg.data.batch_size >= num_train else "per_batch"
