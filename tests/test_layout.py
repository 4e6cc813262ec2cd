"""The layout of a data-parallel run (nodes x devices x accumulation) in one process: how an epoch is dealt out to
micro-batches, the noise each draws, what a resume onto another layout is told. (The runs themselves, on several
processes: test_multinode.py.)"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from ddpmlab.callbacks.ranks import Layout, check_layout, collective_failure, lr_schedule
from ddpmlab.data.order import shard
from ddpmlab.errors import CheckpointError
from ddpmlab.seeding import shard_index
from ddpmlab.training import train


def micro_batches(order: torch.Tensor, batch_size: int, world_size: int, accumulate: int) -> dict[tuple, list]:
    """{(step, micro-batch of the global batch): its items} over all ranks of a layout."""
    out = {}
    for rank in range(world_size):
        items = shard(order, batch_size, rank, world_size, accumulate).view(-1, accumulate, batch_size)
        for step, per_step in enumerate(items):
            for micro, batch in enumerate(per_step):
                out[step, shard_index(rank, world_size, micro)] = batch.tolist()
    return out


def test_every_layout_with_the_same_micro_batches_deals_the_same_items_to_each():
    order = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    two_ranks, one_accumulating, four = (micro_batches(order, 4, w, a) for w, a in ((2, 1), (1, 2), (2, 2)))
    assert two_ranks == one_accumulating and len(two_ranks) == 12 * 2  # 103 // 8 steps, 2 micro-batches each
    # each step's global batch is the next slice of the epoch's order, whatever the layout
    for layout, g in ((two_ranks, 8), (four, 16)):
        steps = {s for s, _ in layout}
        for s in steps:
            items = sorted(i for (t, _), batch in layout.items() if t == s for i in batch)
            assert items == sorted(order[s * g : (s + 1) * g].tolist())
    # without accumulation a rank's share is DistributedSampler's order[rank::world_size] (cut to whole steps)
    assert torch.equal(shard(order, 4, 1, 2), order[1::2][:48])


class RecordDraws(Callback):
    """Records (module._micro, the timesteps drawn) of every training batch in ``DRAWS``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        DRAWS.append((pl_module._micro, outputs["t"].tolist()))


DRAWS: list = []


def test_accumulated_micro_batches_draw_their_own_noise(train_cfg):
    """Each micro-batch of an accumulating process is seeded as the rank that would train it under DDP."""
    DRAWS.clear()
    cfg = train_cfg(
        "trainer.accumulate_grad_batches=2", "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0",
        "+callbacks.draws._target_=test_layout.RecordDraws",
    )  # fmt: skip
    train(cfg)
    assert [m for m, _ in DRAWS] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # (step, micro-batch)
    assert DRAWS[0][1] != DRAWS[1][1]  # the two micro-batches of step 0 drew different timesteps


def test_a_resume_onto_another_layout_continues_exactly_or_is_refused_with_the_reason():
    saved = {"batch_size": 16, "devices": 1, "nodes": 2, "accumulate": 1, "global_batch": 32}
    assert check_layout(saved, Layout(16, 2, 1, 1), "a.ckpt", False) is None  # 1 node x 2 devices
    assert check_layout(saved, Layout(16, 1, 1, 2), "a.ckpt", False) is None  # 1 device accumulating 2
    assert check_layout(None, Layout(8, 1, 1, 1), "a.ckpt", False) is None  # a checkpoint from before layouts
    with pytest.raises(CheckpointError, match=r"global batch would change.*trainer.accumulate_grad_batches=2"):
        check_layout(saved, Layout(16, 1, 1, 1), "a.ckpt", False)
    with pytest.raises(CheckpointError, match=r"micro-batch size would change.*data.batch_size=16"):
        check_layout(saved, Layout(32, 1, 1, 1), "a.ckpt", False)
    warning = check_layout(saved, Layout(32, 1, 1, 1), "a.ckpt", True)
    assert "not the run it would have been" in warning
    assert str(Layout(16, 1, 2, 1)) == "global batch 32 = data.batch_size 16 x 1 device x 2 nodes x accumulate 1"


def test_the_lr_schedule_in_words_and_what_counts_as_a_peer_gone():
    optimizer = {"_target_": "torch.optim.Adam", "lr": 2e-3, "lr_warmup_steps": 100, "lr_schedule": "cosine"}
    config = {"optimizer": optimizer, "trainer": {"max_steps": 1500}}
    assert lr_schedule(config) == (
        "learning rate 0.002 (Adam), linear warm-up over 100 steps, cosine to 0 at step 1500; "
        "stepped once per optimizer step"
    )
    assert collective_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not collective_failure(ValueError("a bug"))
