"""sample.py for image-conditioned models (super-resolution, trained inpainting, latent super-resolution): the inputs
from cond.index or cond.image, num_samples per input, samples.npz and cond.png, every sampler and guidance, the
one-line errors, and exports that sample as their checkpoints do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ddpmlab
from conftest import TINY, compose_cfg, run_cli
from ddpmlab.cli.export import export
from ddpmlab.cli.sample import sample
from ddpmlab.conditioning import Cond, downsample
from ddpmlab.data import DiffusionDataModule
from ddpmlab.errors import ConfigError
from ddpmlab.images import to_uint8
from ddpmlab.samplers import Sampler, generate
from ddpmlab.samplers.masks import make_mask
from ddpmlab.training import train
from test_latent import AE, ldm_overrides

FAST = ["sampler=ddim", "sampler.num_steps=5"]


@pytest.fixture(scope="module")
def sr_ckpt(tmp_path_factory):
    """x2 super-resolution of the digits (4x4 -> 8x8), trained with condition dropout (p_uncond 0.1)."""
    run = tmp_path_factory.mktemp("sr") / "run"
    train(compose_cfg("train", [*TINY, "experiment=sr_digits"], run))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory):
    """Trained inpainting of the digits (masked image + mask), without condition dropout."""
    run = tmp_path_factory.mktemp("inpaint") / "run"
    train(compose_cfg("train", [*TINY, "experiment=inpaint_digits"], run))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def latent_sr_ckpt(tmp_path_factory):
    """x2 super-resolution as latent diffusion: 4x4x2 latents of a (briefly trained) f = 2 first stage, conditioned
    on the 4x4 low-resolution pixels."""
    root = tmp_path_factory.mktemp("latent_sr")
    train(compose_cfg("train", [*AE, "trainer.max_steps=10", "trainer.val_check_interval=10"], root / "ae"))
    overrides = ldm_overrides(root / "ae" / "checkpoints" / "last.ckpt", "task.factor=2")
    overrides[0] = "experiment=ldm_sr_mnist"
    train(compose_cfg("train", overrides, root / "run"))
    return root / "run" / "checkpoints" / "last.ckpt"


def draw(ckpt, out, *overrides: str) -> dict[str, np.ndarray]:
    sample(compose_cfg("sample", [f"ckpt_path={ckpt}", *FAST, *overrides], out), out)
    return dict(np.load(out / "samples.npz"))


def digits_val(*indices: int) -> torch.Tensor:
    dm = DiffusionDataModule("digits")
    dm.setup("fit")
    return torch.stack([dm.val_set[i][0] for i in indices])


def png(path, array: np.ndarray):
    Image.fromarray(array).save(path)
    return path


# ------------------------------------------------------------------ cond.index
def test_sr_draws_num_samples_for_each_validation_input(sr_ckpt, tmp_path):
    npz = draw(sr_ckpt, tmp_path / "a", "cond.index=[0,1,2]", "num_samples=2", "batch_size=2", "save_chain=true")
    originals = digits_val(0, 1, 2)
    assert npz["images"].shape == (6, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert npz["input_index"].tolist() == [0, 0, 1, 1, 2, 2] and npz["split_index"].tolist() == [0, 1, 2]
    assert np.array_equal(npz["original"], to_uint8(originals).permute(0, 2, 3, 1).numpy())
    assert np.array_equal(npz["cond_image"], to_uint8(downsample(originals, 2)).permute(0, 2, 3, 1).numpy())
    # cond.png: 3 rows of input | 2 samples | original, 8x8 cells enlarged to 32 px with 2 px padding
    assert Image.open(tmp_path / "a" / "cond.png").size == (4 * 34 + 2, 3 * 34 + 2)
    assert (tmp_path / "a" / "chain.png").is_file()
    # input 0 alone, same seed and batch size: the same first batch, so the samples are aligned with input_index
    alone = draw(sr_ckpt, tmp_path / "b", "cond.index=0", "num_samples=2", "batch_size=2")
    assert np.array_equal(alone["images"], npz["images"][:2])
    other = draw(sr_ckpt, tmp_path / "c", "cond.index=1", "num_samples=2", "batch_size=2")
    assert not np.array_equal(other["images"], alone["images"])  # same noise, another input: the condition acts


@pytest.mark.parametrize("algorithm", ["ddpm", "ddim", "dpm_solver"])
def test_every_sampler_with_and_without_guidance(sr_ckpt, tmp_path, algorithm):
    steps = [f"sampler={algorithm}", "sampler.num_steps=5", "cond.index=[4,5]", "num_samples=3"]
    plain = draw(sr_ckpt, tmp_path / "plain", *steps)
    guided = draw(sr_ckpt, tmp_path / "guided", *steps, "guidance=3")
    assert plain["images"].shape == guided["images"].shape == (6, 8, 8, 1)
    assert not np.array_equal(plain["images"], guided["images"])  # eq. 6 with w = 3 moves the samples


def test_latent_sr_conditions_on_pixels_and_returns_pixels(latent_sr_ckpt, tmp_path):
    npz = draw(latent_sr_ckpt, tmp_path, "cond.index=[0,1]", "num_samples=2")
    assert npz["images"].shape == (4, 8, 8, 1)  # decoded from 4x4x2 latents
    assert npz["cond_image"].shape == (2, 4, 4, 1) and npz["original"].shape == (2, 8, 8, 1)
    assert np.array_equal(npz["cond_image"], to_uint8(downsample(digits_val(0, 1), 2)).permute(0, 2, 3, 1).numpy())
    with pytest.raises(ConfigError, match="trained with p_uncond=0"):
        draw(latent_sr_ckpt, tmp_path / "g", "cond.index=0", "guidance=1")


def test_inpainting_model_takes_the_masked_image_and_its_mask(inpaint_ckpt, tmp_path):
    npz = draw(inpaint_ckpt, tmp_path / "a", "cond.index=[3,4]", "cond.mask=left_half", "num_samples=2")
    keep = npz["keep"]
    assert np.array_equal(keep, make_mask("left_half", 8).bool().numpy())
    assert npz["images"].shape == (4, 8, 8, 1) and npz["original"].shape == npz["cond_image"].shape == (2, 8, 8, 1)
    assert (npz["cond_image"][:, keep] == npz["original"][:, keep]).all()  # known pixels as they are
    assert (npz["cond_image"][:, ~keep] == 128).all()  # the hole at 0 in [-1, 1]
    with pytest.raises(ConfigError, match="trained with p_uncond=0"):
        draw(inpaint_ckpt, tmp_path / "g", "cond.index=0", "guidance=1")
    with pytest.raises(ConfigError, match=r"not inpaint\.\*"):  # RePaint is for models without an image condition
        draw(inpaint_ckpt, tmp_path / "r", "inpaint.index=0")


def test_inpainting_a_file_with_a_mask_file(inpaint_ckpt, tmp_path):
    image = png(tmp_path / "img.png", np.tile(np.linspace(0, 255, 8).astype(np.uint8), (8, 1)))
    hole = np.full((8, 8), 255, np.uint8)
    hole[2:5, 2:6] = 0
    mask = png(tmp_path / "mask.png", hole)
    npz = draw(inpaint_ckpt, tmp_path / "out", f"cond.image={image}", f"cond.mask={mask}", "num_samples=3")
    assert npz["keep"].sum() == 64 - 12 and npz["images"].shape == (3, 8, 8, 1)
    assert np.array_equal(npz["original"][0, ..., 0], np.asarray(Image.open(image)))
    with pytest.raises(ConfigError, match="takes a 8x8 image"):
        draw(inpaint_ckpt, tmp_path / "small", f"cond.image={png(tmp_path / 's.png', hole[:4, :4])}")


# ------------------------------------------------------------------ cond.image for super-resolution
def test_sr_from_a_low_resolution_file(sr_ckpt, tmp_path):
    low = np.array([[0, 64, 128, 255]] * 4, np.uint8)
    npz = draw(sr_ckpt, tmp_path / "a", f"cond.image={png(tmp_path / 'low.png', low)}", "num_samples=3")
    assert np.array_equal(npz["cond_image"][0, ..., 0], low) and "original" not in npz
    assert npz["images"].shape == (3, 8, 8, 1) and npz["input_index"].tolist() == [0, 0, 0]
    assert Image.open(tmp_path / "a" / "cond.png").size == (4 * 34 + 2, 34 + 2)  # input | 3 samples: no original


def test_sr_file_sizes_and_channels(sr_ckpt, tmp_path):
    full = png(tmp_path / "full.png", np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    with pytest.raises(ConfigError, match=r"is 8x8, the model's output size; it takes the 4x4 .*cond\.downsample=true"):
        draw(sr_ckpt, tmp_path / "a", f"cond.image={full}")
    npz = draw(sr_ckpt, tmp_path / "b", f"cond.image={full}", "cond.downsample=true", "num_samples=2")
    x = torch.from_numpy(np.array(Image.open(full))).float().div(127.5).sub(1)[None, None]
    assert np.array_equal(npz["original"][0, ..., 0], np.asarray(Image.open(full)))
    assert np.array_equal(npz["cond_image"][0, ..., 0], to_uint8(downsample(x, 2))[0, 0].numpy())
    with pytest.raises(ConfigError, match="is 5x5; this model takes a 4x4 image"):
        draw(sr_ckpt, tmp_path / "c", f"cond.image={png(tmp_path / 'odd.png', np.zeros((5, 5), np.uint8))}")
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 255
    with pytest.raises(ConfigError, match="colour image .* takes 1-channel"):
        draw(sr_ckpt, tmp_path / "d", f"cond.image={png(tmp_path / 'red.png', colour)}")
    with pytest.raises(ConfigError, match="cond.image: no file at"):
        draw(sr_ckpt, tmp_path / "e", f"cond.image={tmp_path / 'missing.png'}")


# ------------------------------------------------------------------ errors
def test_condition_errors(sr_ckpt, tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="give its condition with cond.index=<n> .* or cond.image=<png>"):
        draw(sr_ckpt, tmp_path / "a")
    with pytest.raises(ConfigError, match="cond.index=100000 is not an image of the digits 'val' split"):
        draw(sr_ckpt, tmp_path / "b", "cond.index=100000")
    with pytest.raises(ConfigError, match="cond.index=\\[0, 9999\\] is not an image"):
        draw(sr_ckpt, tmp_path / "c", "cond.index=[0,9999]")
    with pytest.raises(ConfigError, match="must be an image number or a list"):
        draw(sr_ckpt, tmp_path / "d", "cond.index=[]")
    with pytest.raises(ConfigError, match="has no image condition: drop them"):
        draw(tiny_ckpt, tmp_path / "e", "cond.index=0")
    with pytest.raises(ConfigError, match="has no image condition"):
        draw(tiny_ckpt, tmp_path / "f", f"cond.image={tmp_path / 'x.png'}")
    ckpt = torch.load(sr_ckpt, weights_only=True)
    del ckpt["ddpmlab_config"]["task"]  # a network with an image input, and nothing that says how to build it
    torch.save(ckpt, tmp_path / "no_task.ckpt")
    with pytest.raises(ConfigError, match="takes a 1-channel image but its stored config names no task"):
        draw(tmp_path / "no_task.ckpt", tmp_path / "g", "cond.index=0")


def test_cli_errors_are_one_line_with_exit_2(sr_ckpt, tmp_path):
    r = run_cli("sample.py", f"ckpt_path={sr_ckpt}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert r.stderr.startswith("ddpmlab: error: ") and "cond.index=<n>" in r.stderr


# ------------------------------------------------------------------ exports
def test_an_export_samples_like_its_checkpoint(sr_ckpt, latent_sr_ckpt, tmp_path):
    for name, ckpt in (("pixel", sr_ckpt), ("latent", latent_sr_ckpt)):
        folder = export(ckpt, tmp_path / name / "export")
        from_ckpt = draw(ckpt, tmp_path / name / "ckpt", "cond.index=[0,1]", "num_samples=2")
        from_export = draw(folder, tmp_path / name / "folder", "cond.index=[0,1]", "num_samples=2")
        assert from_ckpt.keys() == from_export.keys()
        assert all(np.array_equal(from_ckpt[k], from_export[k]) for k in from_ckpt), name
    # ddpmlab.load(folder) draws with a Cond as the checkpoint's model does
    denoiser, cfg = ddpmlab.load(tmp_path / "pixel" / "export")
    reference, _ = ddpmlab.load(sr_ckpt)
    cond = Cond(image=downsample(digits_val(0, 1), 2))
    sampler = Sampler("ddim", 5, "trailing")
    assert torch.equal(generate(denoiser, sampler, 2, cond=cond), generate(reference, sampler, 2, cond=cond))
    assert cfg.task.name == "sr" and cfg.model.cond_channels == 1


def test_model_card_names_the_image_condition_and_its_code_runs(sr_ckpt, tmp_path):
    folder = export(sr_ckpt, tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert "| image condition | task=sr, x2 super-resolution: the 4x4 low-resolution image" in card
    assert "cond_channels=1" in card and "p_uncond=0.1" in card
    code = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(folder))
    scope: dict = {}
    exec(code, scope)  # the card's own lines: load, build the Cond, sample
    assert scope["x0"].shape == (16, 1, 8, 8)
