"""sample.py round trip: train a tiny model, sample from its checkpoint as a user would."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg, run_cli
from ddpmlab.cli.sample import sample
from ddpmlab.errors import CheckpointError
from ddpmlab.samplers import Sampler


def sample_cfg(ckpt, out, *extra):
    return compose_cfg(
        "sample", [f"ckpt_path={ckpt}", "num_samples=10", "batch_size=4", "sampler.num_steps=5", *extra], out
    )


def test_sample_writes_uint8_npz_and_grid(tiny_ckpt, tmp_path):
    out = sample(sample_cfg(tiny_ckpt, tmp_path / "a"), tmp_path / "a")
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert (out / "grid.png").is_file()
    assert len({im.tobytes() for im in images}) == 10  # not one image repeated


def test_same_seed_same_samples_other_seed_other_samples(tiny_ckpt, tmp_path):
    a = np.load(sample(sample_cfg(tiny_ckpt, tmp_path / "a"), tmp_path / "a") / "samples.npz")["images"]
    b = np.load(sample(sample_cfg(tiny_ckpt, tmp_path / "b"), tmp_path / "b") / "samples.npz")["images"]
    c = np.load(sample(sample_cfg(tiny_ckpt, tmp_path / "c", "seed=1"), tmp_path / "c") / "samples.npz")["images"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ema_and_raw_weights_give_different_samples(tiny_ckpt, tmp_path):
    a = np.load(sample(sample_cfg(tiny_ckpt, tmp_path / "a"), tmp_path / "a") / "samples.npz")["images"]
    b = np.load(sample(sample_cfg(tiny_ckpt, tmp_path / "b", "use_ema=false"), tmp_path / "b") / "samples.npz")[
        "images"
    ]
    assert not np.array_equal(a, b)


def test_sample_cli_round_trip(tiny_ckpt, tmp_path):
    r = run_cli(
        "sample.py",
        f"ckpt_path={tiny_ckpt}",
        "num_samples=3",
        "sampler=ddim",
        "sampler.num_steps=4",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "out")
    assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (3, 8, 8, 1)
    used = "Sampler('ddim', num_steps=4, spacing='leading', eta=0.0, clip_x0=True)"
    assert f"sampler: {used}" in r.stdout  # printed, and saved beside the samples
    assert repr(Sampler.from_config(OmegaConf.load(tmp_path / "out" / "sampler.yaml"))) == used


def test_sample_draws_with_the_checkpoints_own_sampler_by_default(tiny_ckpt, tmp_path):
    out = sample(compose_cfg("sample", [f"ckpt_path={tiny_ckpt}", "num_samples=2"], tmp_path), tmp_path)
    trained_with = torch.load(tiny_ckpt, weights_only=True)["ddpmlab_config"]["sampler"]
    assert OmegaConf.to_container(OmegaConf.load(out / "sampler.yaml")) == trained_with


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint at all", "truncated"])
def test_missing_or_corrupt_checkpoint_is_a_clear_error(tiny_ckpt, tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    if content == "truncated":
        bad.write_bytes(tiny_ckpt.read_bytes()[:5000])
    elif content is not None:
        bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="no checkpoint at|not a readable checkpoint"):
        sample(sample_cfg(bad, tmp_path / "o"), tmp_path / "o")


def test_a_foreign_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="not a ddpmlab training checkpoint"):
        sample(sample_cfg(bad, tmp_path / "o"), tmp_path / "o")
