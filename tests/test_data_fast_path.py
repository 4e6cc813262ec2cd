"""The on-device fast path against the DataLoader path: same images per epoch, same flip rate, same value
range, labels aligned; disjoint DDP shards that change every epoch; Lightning drives it; a CPU smoke training
through the CLI's ``train`` on the fast path; file datasets served by persistent DataLoader workers."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from conftest import TINY, compose_cfg
from ddpmlab.data import DeviceLoader, to_model_range
from ddpmlab.training import train
from fixtures_data import (
    assert_model_range,
    datamodule,
    decode,
    images_with_ids,
    make_celeba,
    make_cifar10,
    make_idx_dataset,
    one_epoch,
)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_idx_dataset(root, "MNIST", n_train=512, n_val=40)
    return root


@pytest.mark.parametrize("random_flip", [False, True])
def test_fast_path_serves_what_the_dataloader_path_serves(mnist_root, random_flip):
    torch.manual_seed(0)
    overrides = ("data.batch_size=128", f"data.random_flip={random_flip}")
    slow = datamodule("mnist", mnist_root, "data.on_device=false", *overrides)
    fast = datamodule("mnist", mnist_root, "data.on_device=true", *overrides)
    assert isinstance(slow.train_dataloader(), DataLoader) and isinstance(fast.train_dataloader(), DeviceLoader)
    source = slow.train_set.images
    flip_rates = {}
    for dm in (slow, fast):
        loader = dm.train_dataloader()
        assert len(loader) == 4
        epochs = [one_epoch(loader) for _ in range(2)]
        for x0, y, ids, flipped in epochs:
            assert x0.shape == (512, 1, 28, 28)
            assert_model_range(x0)
            assert sorted(ids.tolist()) == list(range(512)), "every image exactly once per epoch"
            assert torch.equal(y, ids % 10), "labels aligned with their images"
            unflipped = torch.where(flipped[:, None, None, None], x0.flip(-1), x0)
            assert torch.equal(unflipped, to_model_range(source[ids])), "the same images, scaled the same way"
        assert not torch.equal(epochs[0][2], epochs[1][2]), "a new order every epoch"
        flip_rates[type(loader).__name__] = torch.cat([e[3] for e in epochs]).float().mean().item()
        val = one_epoch(dm.val_dataloader())
        assert torch.equal(val[2], torch.arange(40)) and not val[3].any(), "validation: in order, never flipped"
    for rate in flip_rates.values():  # 1,024 flips: std 0.016
        assert (0.44 < rate < 0.56) if random_flip else rate == 0


def test_ddp_ranks_draw_disjoint_shards_that_change_every_epoch():
    images, labels = torch.from_numpy(images_with_ids(101, 1, 8)), torch.arange(101) % 10
    loaders = [
        DeviceLoader(images, labels, 16, shuffle=True, random_flip=True, drop_last=True, seed=3, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1]) == 3, "equal step counts on every rank (50 each, 3 full batches)"
    shards = []
    for epoch in range(2):
        for loader in loaders:
            loader.set_epoch(epoch)
        ids = [one_epoch(loader)[2] for loader in loaders]
        assert not set(ids[0].tolist()) & set(ids[1].tolist())
        shards.append(set(ids[0].tolist()))
    assert shards[0] != shards[1]
    # Without shuffling (validation) the shards still split the set, and cover all of it.
    val = [
        DeviceLoader(images, labels, 16, shuffle=False, random_flip=False, drop_last=False, rank=r, world_size=2)
        for r in range(2)
    ]
    assert sorted(torch.cat([one_epoch(v)[2] for v in val]).tolist()) == list(range(101))


def test_the_datamodule_shards_by_the_trainers_rank(mnist_root):
    dm = datamodule("mnist", mnist_root, "data.on_device=true", "data.batch_size=32")
    seen = []
    for rank in range(2):  # what a DDP trainer exposes: its rank, the world size and the training device
        dm.trainer = SimpleNamespace(
            global_rank=rank, world_size=2, current_epoch=0, strategy=SimpleNamespace(root_device=torch.device("cpu"))
        )
        loader = dm.train_dataloader()
        assert (loader.rank, loader.world_size, len(loader)) == (rank, 2, 8)
        seen.append(set(one_epoch(loader)[2].tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 512


class RecordIds(pl.LightningModule):
    """Records the image ids of every training batch per epoch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x0, y = batch
        ids, _ = decode(x0)
        assert torch.equal(y, ids % 10)
        self.seen.setdefault(self.current_epoch, []).append(ids)
        return (self.w - x0.mean()) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_drives_the_fast_path_with_a_new_permutation_each_epoch(mnist_root):
    cfg = compose_cfg("train", ["data=mnist", f"data.root={mnist_root}", "data.on_device=true", "data.batch_size=128"])
    dm = instantiate(cfg.data)
    module = RecordIds()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert isinstance(trainer.train_dataloader, DeviceLoader)
    orders = [torch.cat(module.seen[e]) for e in (0, 1)]
    assert all(sorted(o.tolist()) == list(range(512)) for o in orders)
    standalone = DeviceLoader(
        dm.train_set.images, dm.train_set.labels, 128, shuffle=True, random_flip=False, drop_last=True, seed=dm.seed
    )
    standalone.set_epoch(1)
    assert torch.equal(orders[1], one_epoch(standalone)[2]), "epoch e uses the permutation of seed + e"


def smoke_cfg(tmp_path, *extra):
    # No callbacks: grids and dashboards sample with the network, which is not what this test is about.
    tiny = [o for o in TINY if not o.startswith("callbacks.")]
    return compose_cfg("train", tiny + ["~callbacks", "trainer.max_steps=3", *extra], tmp_path / "run")


def test_cpu_smoke_training_on_the_fast_path(tmp_path):
    make_cifar10(tmp_path, per_batch=8, n_val=8)
    metrics = train(
        smoke_cfg(
            tmp_path,
            "data=cifar10",
            f"data.root={tmp_path}",
            "data.on_device=true",
            "data.batch_size=4",
            "data.image_size=8",
        )
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_file_datasets_load_in_persistent_worker_processes(tmp_path):
    make_celeba(tmp_path, counts=(8, 2, 2))
    dm = datamodule("celeba", tmp_path, "data.batch_size=4", "data.image_size=8")  # num_workers: auto
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.num_workers >= 1 and loader.persistent_workers
    digits = instantiate(compose_cfg("train", ["data=digits"]).data)
    digits.setup()
    assert digits.train_dataloader().num_workers == 0, "in memory: no worker processes to feed"
    for _ in range(2):  # the same worker serves both epochs
        batches = list(loader)
        assert len(batches) == 2 and all(
            x0.shape == (4, 3, 8, 8) and torch.equal(y, torch.full((4,), -1)) for x0, y in batches
        )
        assert_model_range(torch.cat([x0 for x0, _ in batches]))
