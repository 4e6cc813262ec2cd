"""Datasets through the code path a user runs (the Hydra data configs -> DiffusionDataModule), on tiny files
written in each dataset's real format: shapes, value range, labels, splits, flips, and the errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import compose_cfg
from ddpmlab.api import build_denoiser
from ddpmlab.cli.common import user_error
from ddpmlab.data import NO_LABEL, DiffusionDataModule, to_model_range, to_uint8
from ddpmlab.data.datasets import load_idx
from ddpmlab.errors import ConfigError, DatasetNotFoundError
from fixtures_data import (
    assert_model_range,
    datamodule,
    images_with_ids,
    make_celeba,
    make_cifar10,
    make_folder,
    make_idx_dataset,
    one_epoch,
    write_idx,
)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "name, size, channels, flip",
    [
        ("digits", 8, 1, False),
        ("mnist", 28, 1, False),
        ("fashion_mnist", 28, 1, False),
        ("cifar10", 32, 3, True),
        ("celeba", 64, 3, True),
        ("folder", 64, 3, True),
    ],
)
def test_each_config_states_size_channels_flip_and_feeds_the_model(name, size, channels, flip):
    cfg = compose_cfg("train", [f"data={name}", "model=unet_tiny"])
    assert (cfg.data.image_size, cfg.data.channels, cfg.data.random_flip) == (size, channels, flip)
    assert (cfg.model.image_size, cfg.model.in_channels) == (size, channels)  # ${data.image_size} / ${data.channels}
    assert isinstance(instantiate(cfg.data), DiffusionDataModule)  # nothing is read before setup()


def test_an_image_size_the_unet_cannot_take_is_refused_before_any_data_is_read(tmp_path):
    cfg = compose_cfg(
        "train", ["data=folder", f"data.root={tmp_path / 'nowhere'}", "data.image_size=30", "model=unet_small"]
    )
    with pytest.raises(Exception) as e:  # Hydra's instantiate wraps it; the CLI finds it as user_error does
        build_denoiser(cfg)
    assert "image_size=30 cannot go through this U-Net" in str(user_error(e.value))


def test_bad_data_settings_are_refused_with_the_key_to_fix():
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        DiffusionDataModule(name="imagenet")
    with pytest.raises(ConfigError, match="data.channels must be 1 or 3"):
        DiffusionDataModule(name="folder", channels=4)
    with pytest.raises(ConfigError, match="on_device=true needs a dataset held in memory"):
        DiffusionDataModule(name="celeba", on_device=True)
    with pytest.raises(ConfigError, match="num_workers"):
        DiffusionDataModule(num_workers=-1)


# ---------------------------------------------------------------------------------------------- MNIST-like, CIFAR-10
@pytest.mark.parametrize(
    "name, folder, gz", [("mnist", "MNIST", True), ("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)]
)
def test_idx_datasets_read_the_files_as_distributed(tmp_path, name, folder, gz):
    make_idx_dataset(tmp_path, folder, n_train=40, n_val=12, gz=gz)
    dm = datamodule(name, tmp_path, "data.batch_size=16")
    assert dm.train_set.images.shape == (40, 1, 28, 28) and len(dm.val_set) == 12  # val = the t10k files
    assert torch.equal(dm.train_set.images[:, 0], torch.from_numpy(images_with_ids(40, 1, 28, 0)[:, 0]))
    x0, y, ids, flipped = one_epoch(dm.train_dataloader())
    assert x0.shape == (32, 1, 28, 28) and y.dtype == torch.long  # drop_last: 2 full batches of 16
    assert_model_range(x0)
    assert torch.equal(y, ids % 10) and not flipped.any()  # labels ride with their images; no flips for digits
    assert torch.equal(x0, to_model_range(dm.train_set.images[ids]))


def test_the_idx_reader_agrees_with_torchvisions(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = make_idx_dataset(tmp_path, "MNIST", n_train=10, n_val=3, gz=False)
    images, labels = load_idx(tmp_path, "mnist", "train")
    assert torch.equal(images[:, 0], read_image_file(str(raw / "train-images-idx3-ubyte")))
    assert torch.equal(labels, read_label_file(str(raw / "train-labels-idx1-ubyte")))


def test_cifar10_reads_the_pickled_batches(tmp_path):
    make_cifar10(tmp_path, per_batch=8, n_val=6)
    dm = datamodule("cifar10", tmp_path, "data.batch_size=10")
    assert dm.train_set.images.shape == (40, 3, 32, 32) and len(dm.val_set) == 6
    # Rows of 3,072 bytes are channel-major (1,024 R, then G, then B), and the five batches come in order.
    assert torch.equal(dm.train_set.images, torch.from_numpy(images_with_ids(40, 3, 32, 0)))
    assert torch.equal(dm.train_set.labels, torch.arange(40) % 10)
    x0, y, ids, flipped = one_epoch(dm.train_dataloader())
    assert_model_range(x0)
    assert torch.equal(y, ids % 10) and sorted(ids.tolist()) == list(range(40))
    mirrored = torch.where(flipped[:, None, None, None], x0.flip(-1), x0)
    assert torch.equal(mirrored, to_model_range(dm.train_set.images[ids]))  # a flip is an exact mirror


def test_in_memory_images_are_resized_once_to_the_configured_size(tmp_path):
    make_idx_dataset(tmp_path, "MNIST", n_train=16, n_val=4)
    dm = datamodule("mnist", tmp_path, "data.image_size=32")
    assert dm.train_set.images.shape == (16, 1, 32, 32) and dm.train_set.images.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- CelebA, folders
def test_celeba_official_split_crop_140_then_64(tmp_path):
    make_celeba(tmp_path, counts=(6, 3, 2))
    dm = datamodule("celeba", tmp_path, "data.batch_size=3", "data.num_workers=0")
    assert (len(dm.train_set), len(dm.val_set)) == (6, 3)  # partition 0 trains, 1 validates, 2 is left out
    x0, y = next(iter(dm.val_dataloader()))
    assert x0.shape == (3, 3, 64, 64) and torch.equal(y, torch.full((3,), NO_LABEL))
    assert_model_range(x0)
    img = to_uint8(x0[0]).int()
    # The 140 crop keeps the coloured square only (no black border); its white band (30 of 140 columns) is on the left.
    green = torch.tensor([30, 200, 30])[:, None, None]
    assert (img[:, 2:-2, 16:-2] - green).abs().max() < 20, "valid images are green (JPEG blurs the outer pixels)"
    assert (img[:, :, :12] > 235).all() and img.sum(0).min() > 200
    train_x0, _ = next(iter(dm.train_dataloader()))
    assert (to_uint8(train_x0)[:, 0, 32, 40].int() > 150).all(), "train images are red"


def test_folder_of_png_and_jpeg_any_mode_labels_from_subfolders(tmp_path):
    make_folder(tmp_path / "imgs", per_class=8)
    dm = datamodule(
        "folder",
        tmp_path / "imgs",
        "data.image_size=16",
        "data.val_fraction=0.25",
        "data.batch_size=4",
        "data.num_workers=0",
    )
    assert (len(dm.train_set), len(dm.val_set)) == (12, 4)
    assert {p.suffix for p in dm.train_set.paths} == {".png", ".jpg"}
    assert set(dm.train_set.labels.tolist()) == {0, 1}  # cats, dogs
    x0, y = next(iter(dm.train_dataloader()))
    assert x0.shape == (4, 3, 16, 16) and y.dtype == torch.long
    assert_model_range(x0)
    grey = datamodule("folder", tmp_path / "imgs", "data.image_size=8", "data.channels=1", "data.num_workers=0")
    x, _ = grey.train_set[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32  # items are x0 in [-1, 1], unflipped


def test_folder_resizes_the_shorter_side_then_centre_crops(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 255  # the middle third: it fills a centre-cropped square
    Image.fromarray(img).save(tmp_path / "wide.png")
    dm = datamodule("folder", tmp_path, "data.image_size=10", "data.val_fraction=0", "data.num_workers=0")
    x, y = dm.train_set[0]
    assert x.shape == (3, 10, 10) and (to_uint8(x)[:, :, 1:-1] == 255).all() and int(y) == NO_LABEL  # no sub-folders
    assert dm.val_dataloader() == []


def test_flips_are_on_where_the_config_says(tmp_path):
    make_cifar10(tmp_path, per_batch=40, n_val=4)
    torch.manual_seed(0)
    _, _, _, flipped = one_epoch(datamodule("cifar10", tmp_path, "data.batch_size=50").train_dataloader())
    assert 0.35 < flipped.float().mean() < 0.65
    _, _, _, flipped = one_epoch(datamodule("cifar10", tmp_path, "data.random_flip=false").train_dataloader())
    assert not flipped.any()
    _, _, _, flipped = one_epoch(datamodule("cifar10", tmp_path).val_dataloader())
    assert not flipped.any(), "validation images are never flipped"


# ---------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", ["MNIST/raw", "train-images-idx3-ubyte", "ossci-datasets", "data.download=true"]),
        ("fashion_mnist", ["FashionMNIST/raw", "train-labels-idx1-ubyte", "fashion-mnist", "data.download=true"]),
        ("cifar10", ["cifar-10-batches-py", "data_batch_1", "cifar-10-python.tar.gz", "data.download=true"]),
        ("celeba", ["celeba", "list_eval_partition.txt", "img_align_celeba", "CelebA.html"]),
        ("folder", ["does not exist", "data.root"]),
    ],
)
def test_a_missing_dataset_names_where_it_looked_what_it_expected_and_how_to_get_it(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as e:
        datamodule(name, tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    for text in expected:
        assert text in str(e.value)


@pytest.mark.parametrize("gz", [True, False])
def test_a_truncated_idx_file_is_named(tmp_path, gz):
    raw = make_idx_dataset(tmp_path, "MNIST", n_train=20, n_val=4, gz=gz)
    victim = raw / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt") as e:
        datamodule("mnist", tmp_path)
    assert str(victim) in str(e.value)


def test_idx_images_and_labels_that_disagree_are_refused(tmp_path):
    raw = make_idx_dataset(tmp_path, "MNIST", n_train=20, n_val=4)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(19))
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte.gz"):
        datamodule("mnist", tmp_path)


def test_a_corrupt_cifar_batch_is_named(tmp_path):
    folder = make_cifar10(tmp_path, per_batch=4, n_val=4)
    victim = folder / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(ConfigError, match="truncated or corrupt") as e:
        datamodule("cifar10", tmp_path)
    assert str(victim) in str(e.value)


def test_celeba_with_missing_images_or_a_broken_partition_file(tmp_path):
    base = make_celeba(tmp_path, counts=(3, 2, 1))
    (base / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(
        DatasetNotFoundError, match="1 of the 3 CelebA train images .* missing from .*first: 000002.jpg"
    ):
        datamodule("celeba", tmp_path)
    (base / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg train\n")
    with pytest.raises(ConfigError, match="list_eval_partition.txt line 2"):
        datamodule("celeba", tmp_path)


def test_an_empty_image_folder_is_refused_with_its_path(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="no images in") as e:
        datamodule("folder", tmp_path / "imgs")
    assert str(tmp_path / "imgs") in str(e.value)


def test_a_truncated_image_is_named_when_read(tmp_path):
    make_folder(tmp_path, classes=("a",), per_class=2)
    victim = tmp_path / "a" / "img_0.jpg"
    dm = datamodule("folder", tmp_path, "data.val_fraction=0", "data.num_workers=0")
    victim.write_bytes(victim.read_bytes()[:100])  # broken after setup: named when read
    with pytest.raises(ConfigError, match="cannot read image") as e:
        list(dm.train_dataloader())
    assert str(victim) in str(e.value)
    with pytest.raises(ConfigError, match="cannot read image") as e:  # and at setup, before any training
        datamodule("folder", tmp_path, "data.val_fraction=0", "data.num_workers=0")
    assert str(victim) in str(e.value)


def test_labels_outside_num_classes_are_refused(tmp_path):
    make_celeba(tmp_path, counts=(2, 1, 1))
    with pytest.raises(ConfigError, match="data.num_classes=10"):
        datamodule("celeba", tmp_path, "data.num_classes=10")


def test_gzip_that_is_not_gzip_is_named(tmp_path):
    raw = make_idx_dataset(tmp_path, "MNIST", n_train=8, n_val=4)
    victim = raw / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(gzip.decompress(victim.read_bytes())[:6])  # plain bytes, and short, under a .gz name
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.gz is truncated or corrupt"):
        datamodule("mnist", tmp_path)
