"""Nothing read from a file runs code, and no failure leaves a checkpoint that resume could mistake for work:
crafted checkpoints and CIFAR-10 batches are refused before anything they name is called; checkpoints are
written atomically, and a full disk is one line naming the directory while the earlier checkpoint stays whole."""

import errno
import os
import pathlib
import pickle

import pytest
import torch

from conftest import run_cli
from ddpmlab import fileio
from ddpmlab.api import denoiser_from_checkpoint, load, load_checkpoint
from ddpmlab.callbacks import checkpoint as ckpt_io
from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.training import resume_path, train
from fixtures_data import datamodule, make_cifar10


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def trained(tiny_ckpt):
    return tiny_ckpt  # read only: the crafted copies go to each test's tmp_path


def crafted(trained, tmp_path, section):
    """A checkpoint that loads with weights_only=True but whose stored ``section`` config, instantiated, would
    unpickle ``Payload`` through torch.load(weights_only=False) over inline bytes."""
    marker = tmp_path / "marker"
    ckpt = torch.load(trained, weights_only=True)
    ckpt["ddpmlab_config"][section] = {
        "_target_": "torch.load",
        "weights_only": False,
        "f": {"_target_": "io.BytesIO", "initial_bytes": pickle.dumps(Payload(marker))},
    }
    path = tmp_path / f"crafted_{section}.ckpt"
    torch.save(ckpt, path)
    return path, marker


@pytest.mark.parametrize("section", ["model", "schedule", "sampler", "data"])
def test_a_crafted_checkpoint_runs_nothing(trained, tmp_path, section):
    path, marker = crafted(trained, tmp_path, section)
    with pytest.raises(CheckpointError, match=rf"refused to build {section}._target_='torch.load'"):
        load(path)
    assert not marker.exists()


def test_sample_py_refuses_a_crafted_checkpoint_in_one_line(trained, tmp_path):
    path, marker = crafted(trained, tmp_path, "model")
    r = run_cli("sample.py", f"ckpt_path={path}", "num_samples=2", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert not marker.exists()
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert "refused to build model._target_='torch.load'" in r.stderr


def test_evaluate_rebuilds_the_stored_data_config_only_through_the_allow_list(trained, tmp_path):
    path, marker = crafted(trained, tmp_path, "data")
    r = run_cli("evaluate.py", f"ckpt_path={path}", "bpd.num_images=2", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert r.returncode == 2 and "refused to build data._target_='torch.load'" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_nested_targets_are_checked_too(trained, tmp_path):
    ckpt = load_checkpoint(trained)
    ckpt["ddpmlab_config"]["model"]["channel_mult"] = {"_target_": "builtins.eval", "_args_": ["[1, 2]"]}
    with pytest.raises(CheckpointError, match=r"model.channel_mult._target_='builtins.eval'"):
        denoiser_from_checkpoint(ckpt)


def test_an_escaped_interpolation_cannot_smuggle_a_target_in(trained, tmp_path):
    ckpt = load_checkpoint(trained)
    ckpt["ddpmlab_config"]["model"]["base_channels"] = "\\${oc.create:{_target_: builtins.print, _args_: [pwned]}}"
    with pytest.raises(CheckpointError, match=r"model.base_channels=.* is an interpolation"):
        denoiser_from_checkpoint(ckpt)


def test_ddpmlabs_own_targets_rebuild_and_trusted_ones_can_be_named(trained, tmp_path):
    denoiser, cfg = load(trained)
    assert cfg.model._target_ == "ddpmlab.networks.UNet"
    ckpt = load_checkpoint(trained)
    ckpt["ddpmlab_config"]["model"]["_target_"] = "ddpmlab.networks.unet.UNet"  # the defining module's path
    denoiser_from_checkpoint(ckpt)
    ckpt["ddpmlab_config"]["model"]["_target_"] = "torch.nn.Identity"
    with pytest.raises(CheckpointError, match="torch.nn.Identity"):
        denoiser_from_checkpoint(ckpt)


def test_a_crafted_cifar_batch_runs_nothing(tmp_path):
    folder = make_cifar10(tmp_path, per_batch=4, n_val=4)
    marker = tmp_path / "marker"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": Payload(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(ConfigError, match=r"data_batch_2 is not a CIFAR-10 batch: it asks to call posix.system"):
        datamodule("cifar10", tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- atomic writes
def test_checkpoints_are_written_in_their_own_directory(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.path.dirname(src), os.path.dirname(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    ckpt_io.atomic_write(b"abc", tmp_path / "sub" / "x.ckpt")
    assert (tmp_path / "sub" / "x.ckpt").read_bytes() == b"abc"
    assert seen == [(str(tmp_path / "sub"), str(tmp_path / "sub"))]  # a rename, never a copy across filesystems
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "sub" / "x.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes


def full_disk_after(monkeypatch, limit):
    """Checkpoint files accept ``limit`` bytes, then fail with ENOSPC, as on a full disk."""
    real_write_bytes = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.suffix != ".ckpt":
            return real_write_bytes(self, data)
        real_write_bytes(self, bytes(data[:limit]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def test_a_full_disk_keeps_the_earlier_checkpoint_and_says_which_directory(train_cfg, tmp_path, monkeypatch):
    from ddpmlab.errors import DiskFullError

    run = tmp_path / "run"
    train(train_cfg())
    ckpts = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    full_disk_after(monkeypatch, 1000)
    with pytest.raises(DiskFullError, match=rf"no space left in {ckpts} to write step_0000009.ckpt"):
        train(train_cfg("trainer.max_steps=12"))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # no partial file, no on_exception.ckpt
    assert resume_path(train_cfg("ckpt_path=last"), run) == str(ckpts / "last.ckpt")
    train(train_cfg("trainer.max_steps=12"))  # space freed: it continues from step 6
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12
