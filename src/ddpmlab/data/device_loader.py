"""The fast path for datasets that fit in memory: the whole split as one uint8 tensor on the training device.

Per epoch, one permutation and one flip mask for the whole split are drawn from a generator seeded with
``seed + epoch`` -- the same on every rank -- and rank ``r`` of ``world_size`` takes its shard of it (data/order.py's
``shard``: every ``world_size``-th position, as torch's DistributedSampler does, without accumulation): disjoint
shards that change every epoch. Per batch, a
gather, a flip and a scale run on the device. No workers, no host-to-device copies, no per-item Python.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ddpmlab.data.datasets import ImageTensorDataset, mirror
from ddpmlab.data.order import ResumesAtStep, epoch_order, shard
from ddpmlab.images import to_model_range


class DeviceLoader(ResumesAtStep):
    """Iterable of (x0 float [B,C,H,W] in [-1, 1], label long [B]) batches, like a DataLoader over the same
    images with ``shuffle``, ``drop_last`` and random flips, but drawn on the device the images live on."""

    def __init__(
        self,
        images: Tensor,  # uint8 [N,C,H,W]
        labels: Tensor,  # long [N]
        batch_size: int,
        *,
        shuffle: bool,
        random_flip: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,  # micro-batches per optimizer step (training: how the epoch is dealt, data/order.py)
        device: torch.device | str | None = None,
        # batches per epoch -> (epoch, batches of it already trained on) where the trainer stands (data/order.py);
        # None, or a None answer: count passes here (set_epoch sets the count)
        position: Callable[[int], tuple[int, int] | None] | None = None,
    ):
        assert images.dtype == torch.uint8 and images.ndim == 4 and labels.shape == images.shape[:1]
        assert 0 <= rank < world_size
        self.device = torch.device(device) if device is not None else images.device
        self.images, self.labels = images.to(self.device), labels.long().to(self.device)
        self.dataset = ImageTensorDataset(self.images, self.labels)  # as a DataLoader has (len(loader.dataset))
        self.batch_size, self.shuffle, self.random_flip = batch_size, shuffle, random_flip
        self.seed, self.rank, self.world_size, self.accumulate = seed, rank, world_size, accumulate
        n = images.shape[0]
        # Training shards are cut to equal length so that every rank runs the same number of steps.
        shard_size = len(shard(torch.arange(n), batch_size, rank, world_size, accumulate))
        self.shard_size = shard_size if drop_last else len(range(rank, n, world_size))
        self.drop_last = drop_last and self.shard_size >= batch_size
        self.epoch, self.position = 0, position

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def __iter__(self):
        n = self.images.shape[0]
        # a resumed run continues with the permutation of the epoch it stopped in, from the batch it stopped at
        where = self.position(len(self)) if self.position is not None else None
        self.epoch, skip = where if where is not None else (self.epoch, 0)
        order, flip = epoch_order(n, self.seed, self.epoch, self.shuffle, self.random_flip, self.device)
        if self.drop_last:
            mine = shard(order, self.batch_size, self.rank, self.world_size, self.accumulate)
        else:
            mine = order[self.rank :: self.world_size][: self.shard_size]
        self.epoch += 1  # plain iteration (no Lightning) also gets a fresh order every epoch
        for start in range(skip * self.batch_size, len(self) * self.batch_size, self.batch_size):
            i = mine[start : start + self.batch_size]
            images = self.images[i] if flip is None else mirror(self.images[i], flip[i])  # flipped while uint8
            yield to_model_range(images), self.labels[i]
