"""Every seed ddpmlab derives from a run's seed, in one place.

A derived seed is a function of the run's seed and of where the draw happens (rank, step, epoch, batch) alone, never
of what the process did before. So a run resumed from a checkpoint draws at step k exactly what the uninterrupted run
drew there (the global step is in every checkpoint; a generator's state is not), and under DDP every rank draws its
own noise (``seed_everything`` alone gives all ranks the same)."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed for ``parts`` (blake2b of their '/'-joined text): distinct for every tuple in practice, and the
    same in every process and on every machine (Python's own ``hash`` of a string is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_index(rank: int, world_size: int, micro: int = 0) -> int:
    """Which micro-batch of an optimizer step's global batch rank ``rank`` trains on as its ``micro``-th
    (data/order.py's ``shard``): the rank itself without gradient accumulation. Seeds keyed by it rather than by the
    rank draw the same on every layout with the same batch size and number of micro-batches (2 nodes x 1 device,
    1 x 2, 1 device accumulating 2)."""
    return micro * world_size + rank


def step_seed(seed: int, rank: int, step: int) -> int:
    """Training step ``step`` of micro-batch ``rank`` (:func:`shard_index`; the rank without accumulation): its t,
    eps, label dropout (and network dropout)."""
    return derive_seed(seed, rank, step)


def validation_seed(seed: int, rank: int, batch_idx: int) -> int:
    """Validation batch ``batch_idx`` on ``rank``: the same t and eps at every validation, so val/loss compares like
    with like over a run."""
    return derive_seed("val", seed, rank, batch_idx)


def batch_seed(seed: int, rank: int, epoch: int, index: int, split: str = "train") -> int:
    """Batch ``index`` of epoch ``epoch`` on ``rank`` (latent diffusion's posterior sample of the batch)."""
    return derive_seed(split, seed, rank, epoch, index)


def epoch_seed(seed: int, epoch: int) -> int:
    """The order and flips of epoch ``epoch``, the same on every rank: ``seed + epoch`` (the README's
    ``data.seed + e``)."""
    return seed + epoch


def seed_step(generator: torch.Generator, seed: int, rank: int, step: int) -> None:
    """Seed a module's training step: ``generator`` (its t, eps and label dropout) and torch's global generator,
    which dropout layers draw from, on a different stream (``>> 1``; host-side on CUDA, no sync)."""
    derived = step_seed(seed, rank, step)
    generator.manual_seed(derived)
    torch.manual_seed(derived >> 1)
