"""The order of a training epoch as a function of (seed, epoch) alone, and where a resumed run stands in it.

Epoch ``e`` visits the items in the permutation drawn from a generator seeded with ``seed + e`` and flips those
that the same generator's flip mask marks, on every rank alike (each rank takes every ``world_size``-th item).
Nothing depends on what ran before, so a run resumed from a checkpoint written in the middle of an epoch skips
the batches the trainer has already stepped through and sees exactly the batches the uninterrupted run saw.
Draws made per batch (latent diffusion's posterior sample) take their seed from the batch's place in this order
(:func:`ddpmlab.seeding.batch_seed`), not from a generator whose state depends on what the process did before.

Under DDP and gradient accumulation an epoch is dealt out by :func:`shard`, so that the layout (nodes x devices x
accumulation) does not change which items meet which noise."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ddpmlab.data.datasets import random_flip_mask
from ddpmlab.seeding import batch_seed as batch_seed  # where latent diffusion's loaders take it from
from ddpmlab.seeding import epoch_seed


def epoch_order(
    n: int, seed: int, epoch: int, shuffle: bool, random_flip: bool, device=None
) -> tuple[Tensor, Tensor | None]:
    """(order [n], flip [n] bool or None) of epoch ``epoch``."""
    g = torch.Generator(device).manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g, device=device) if shuffle else torch.arange(n, device=device)
    flip = random_flip_mask(n, g, device) if random_flip else None
    return order, flip


def shard(order: Tensor, batch_size: int, rank: int = 0, world_size: int = 1, accumulate: int = 1) -> Tensor:
    """This rank's items of an epoch's ``order``, micro-batch after micro-batch.

    Optimizer step k trains on the global batch ``order[k*G : (k+1)*G]`` (G = batch_size x world_size x
    accumulate), dealt out like cards to its S = world_size x accumulate micro-batches: item ``k*G + j*S + s``
    goes to micro-batch ``s``, and rank ``rank`` trains on micro-batches ``s = i * world_size + rank`` (i < accumulate,
    in that order). A micro-batch draws its noise from (seed, s, step) (:func:`ddpmlab.seeding.shard_index`), so
    every layout with the same batch_size and S trains on the same (item, noise) pairs: 2 nodes x 1 device, 1 node x
    2 devices, 1 device accumulating 2. With accumulate = 1 this is DistributedSampler's ``order[rank::world_size]``.
    The incomplete global batch at an epoch's end is dropped (a dataset smaller than one global batch: this rank's
    ``order[rank::world_size]`` cut to equal length)."""
    s = world_size * accumulate
    steps = len(order) // (batch_size * s)
    if steps == 0:
        return order[rank::world_size][: len(order) // world_size]
    grid = order[: steps * batch_size * s].view(steps, batch_size, accumulate, world_size)[..., rank]  # [steps,B,A]
    return grid.transpose(1, 2).reshape(-1)


def position(trainer, batches_per_epoch: int) -> tuple[int, int] | None:
    """(epoch, batches of it already trained on) where the trainer stands, from its global step alone (one step per
    batch of ``batches_per_epoch``, gradient accumulation counted); None where there is no trainer to ask.

    Lightning's own epoch counter is not used: a checkpoint written when max_steps ends a run mid-epoch records
    that epoch as completed, and a run resumed from it would start the next permutation too early."""
    step = getattr(trainer, "global_step", None)
    if not isinstance(step, int) or batches_per_epoch < 1:
        return None
    limit = getattr(trainer, "limit_train_batches", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches_per_epoch = min(batches_per_epoch, limit)
    elif isinstance(limit, float) and limit < 1:
        batches_per_epoch = max(1, int(batches_per_epoch * limit))
    return divmod(step * getattr(trainer, "accumulate_grad_batches", 1), batches_per_epoch)


class ResumesAtStep:
    """A training loader that continues mid-epoch exactly where a checkpoint stopped: where it stands is a
    function of the trainer's global step alone (:func:`position`), which every checkpoint holds, so it has no
    state of its own to save. The ``state_dict`` / ``load_state_dict`` pair is how Lightning recognises a
    resumable loader; without it Lightning warns on every mid-epoch resume that the loader is not resumable."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class EpochSampler(DistributedSampler):
    """The DataLoader path's sampler: yields ``(index, flip)`` of this rank's share of :func:`epoch_order`, from
    the first batch not yet trained on. A DistributedSampler, so that Lightning does not replace it under DDP."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        random_flip: bool,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
        position: Callable[[int], tuple[int, int] | None] | None = None,
    ):
        self.n, self.batch_size, self.seed, self.random_flip = n, batch_size, seed, random_flip
        self.rank, self.num_replicas, self.shuffle, self.drop_last = rank, world_size, True, True
        self.accumulate = accumulate
        # equal shards: every rank runs the same number of steps
        self.num_samples = len(shard(torch.arange(n), batch_size, rank, world_size, accumulate))
        self.epoch, self.position = 0, position

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        batches = max(1, self.num_samples // self.batch_size)
        where = self.position(batches) if self.position is not None else None
        self.epoch, skip = where if where is not None else (self.epoch, 0)
        order, flip = epoch_order(self.n, self.seed, self.epoch, True, self.random_flip)
        mine = shard(order, self.batch_size, self.rank, self.num_replicas, self.accumulate).tolist()
        flips = [False] * self.n if flip is None else flip.tolist()
        self.epoch += 1  # plain iteration (no Lightning) gets a fresh order every pass
        return iter([(i, flips[i]) for i in mine[skip * self.batch_size :]])


class EpochDataLoader(ResumesAtStep, DataLoader):
    """The DataLoader path's training loader: a DataLoader whose :class:`EpochSampler` resumes mid-epoch."""

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(self.sampler, EpochSampler):  # Lightning put its own in place (trainer.overfit_batches)
            rank_zero_warn(
                f"ddpmlab: this resume restarts the epoch at its first batch (the training sampler is a "
                f"{type(self.sampler).__name__}, not ddpmlab's), so it does not continue exactly where it stopped"
            )


class Flipped(Dataset):
    """``dataset`` indexed by ``(index, flip)``: the item, mirrored left-right where ``flip``. A plain index (a
    sampler Lightning put in place, e.g. for ``trainer.overfit_batches``) is the item unflipped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool] | int) -> tuple[Tensor, Tensor]:
        i, flip = (key, False) if isinstance(key, int) else key
        x0, label = self.dataset[i]
        return (x0.flip(-1) if flip else x0), label
