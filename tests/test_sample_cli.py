"""sample.py round trip: train a tiny model, sample from its checkpoint as a user would."""

import struct
import zlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_cfg, run_cli
from ddpmlab.cli.sample import sample
from ddpmlab.errors import CheckpointError, ConfigError
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


# ------------------------------------------------------------------ image files, decoded by PIL
def png_cut_in_half(path):
    """A real PNG (PIL), then only its first half: what a failed copy or download leaves."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def png_with_rows_missing(path, size: int):
    """A PNG whose compressed data holds a quarter of the rows its header promises (libpng: 'Not enough image
    data'); torchvision's decoder died on it with SIGSEGV."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)  # grey, 8 bits
    rows = zlib.compress((b"\0" + b"\xff" * size) * (size // 4))  # filter byte 0, then white pixels
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("setting", ["inpaint.image", "inpaint.mask"])
def test_a_truncated_png_is_one_line_not_a_crash(tiny_ckpt, tmp_path, setting):
    bad = png_cut_in_half(tmp_path / "cut.png")
    image = [f"inpaint.image={bad}"] if setting == "inpaint.image" else ["inpaint.index=0", f"inpaint.mask={bad}"]
    r = run_cli("sample.py", f"ckpt_path={tiny_ckpt}", *image, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"ddpmlab: error: cannot read {'inpaint.image' if setting == 'inpaint.image' else 'the mask image'} {bad} "
        "(image file is truncated); give a PNG or JPEG"
    ]


def test_a_png_missing_rows_does_not_crash(tiny_ckpt, tmp_path):
    short = png_with_rows_missing(tmp_path / "short.png", 8)
    r = run_cli(
        "sample.py",
        f"ckpt_path={tiny_ckpt}",
        f"inpaint.mask={short}",
        "inpaint.index=0",
        "num_samples=2",
        "inpaint.num_steps=4",
        "inpaint.jump_length=1",
        "inpaint.jump_n_sample=1",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]  # PIL decodes what is there; the missing rows come out black
    assert np.load(tmp_path / "out" / "samples.npz")["keep"].sum() == 2 * 8  # the two rows present: white, known


def test_every_image_reader_is_pils(tmp_path, monkeypatch):
    """inpaint.image, inpaint.mask and data=folder images: one reader, the same errors."""
    from ddpmlab.data.files import ImageFileDataset
    from ddpmlab.images import load_image
    from ddpmlab.samplers.masks import load_mask

    bad = png_cut_in_half(tmp_path / "cut.png")
    with pytest.raises(ConfigError, match=f"cannot read inpaint.image {bad} \\(image file is truncated\\)"):
        load_image(bad, 3, 8, what="inpaint.image")
    with pytest.raises(ConfigError, match=f"cannot read the mask image {bad} \\(image file is truncated\\)"):
        load_mask(bad, 8)
    with pytest.raises(ConfigError, match=f"cannot read image {bad} \\(image file is truncated\\); replace or remove"):
        ImageFileDataset([bad], torch.zeros(1), 8, 3)[0]
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(good)
    assert load_image(good, 1, 8).shape == (1, 1, 8, 8)
    bomb = png_with_rows_missing(tmp_path / "bomb.png", 10_000)  # 10^8 pixels promised in a 100 KB file
    with pytest.raises(ConfigError, match="Image size \\(100000000 pixels\\) exceeds limit of 89478485 pixels"):
        load_image(bomb, 1, 8)  # refused before decoding, where PIL only warns (under twice its limit)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over the limit, under twice it
    for read in (
        lambda: load_image(good, 1, 8),
        lambda: load_mask(good, 8),
        lambda: ImageFileDataset([good], torch.zeros(1), 8, 1)[0],
    ):
        with pytest.raises(ConfigError, match="exceeds limit of 1000 pixels"):
            read()
