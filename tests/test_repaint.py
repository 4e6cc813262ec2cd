"""RePaint inpainting (Lugmayr et al. 2022): the jump schedule, the known pixels, the harmonisation that
resampling buys (an exact oracle), the mask presets and files, and sample.py's inpainting mode."""

import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from conftest import compose_cfg, run_cli, tiny_denoiser
from ddpmlab.cli.sample import sample
from ddpmlab.diffusion import Denoiser, GaussianDiffusion, linear_betas, make_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.images import to_model_range, to_uint8
from ddpmlab.networks import UNet
from ddpmlab.samplers import Sampler
from ddpmlab.samplers.masks import PRESETS, centre_square, left_half, load_mask, make_mask, random_strokes
from ddpmlab.samplers.repaint import repaint_sample, repaint_sample_progressive, repaint_schedule


# ------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("S,j,r", [(10, 3, 2), (25, 5, 4), (250, 10, 10), (12, 1, 3)])
def test_schedule_matches_diffusers_repaint_scheduler(S, j, r):
    diffusers = pytest.importorskip("diffusers")
    T = 1000
    ref = diffusers.RePaintScheduler(num_train_timesteps=T)
    ref.set_timesteps(S, jump_length=j, jump_n_sample=r)
    states = repaint_schedule(S, j, r)
    assert states[-1] == -1  # ends at x_0
    assert [k * (T // S) for k in states[:-1]] == ref.timesteps.tolist()


def test_schedule_shape():
    assert repaint_schedule(6, 1, 1) == [5, 4, 3, 2, 1, 0, -1]  # no resampling: plain descent
    s = repaint_schedule(250, 10, 10)
    assert all(abs(a - b) == 1 for a, b in itertools.pairwise(s)) and max(s) == 249
    reverse = sum(b < a for a, b in itertools.pairwise(s))
    assert reverse == 250 + 9 * 10 * len(range(0, 240, 10))  # each of 24 stretches of 10 steps passed 10 times
    with pytest.raises(AssertionError):  # Sampler refuses these configurations (see below)
        repaint_schedule(10, 10, 2)
    with pytest.raises(AssertionError):
        repaint_schedule(10, 0, 1)


# ------------------------------------------------------------------ the sampler
def repaint_denoiser():
    return tiny_denoiser(100)


@pytest.mark.parametrize("j,r", [(1, 1), (3, 3)])
def test_known_pixels_of_the_result_equal_the_original(j, r):
    den = repaint_denoiser()
    g = torch.Generator().manual_seed(0)
    original = torch.randint(0, 256, (1, 1, 8, 8), generator=g, dtype=torch.uint8)
    keep = make_mask("random_strokes", 8, g)
    x = repaint_sample(
        den,
        torch.randn(4, 1, 8, 8, generator=g),
        make_timesteps(100, 20),
        x0=to_model_range(original),
        keep=keep,
        generator=g,
        jump_length=j,
        jump_n_sample=r,
    )
    known = keep.bool().expand(4, 1, 8, 8)
    out = to_uint8(x)
    assert torch.equal(out[known], original.expand(4, 1, 8, 8)[known])  # exact after quantisation
    assert (
        out[~known].int() - original.expand(4, 1, 8, 8)[~known].int()
    ).abs().float().mean() > 10  # generated, not copied
    assert not torch.equal(out[0], out[1])  # independent completions


def test_each_reverse_step_replaces_the_known_pixels_by_the_noised_original():
    """x_{t-1}^known ~ q(x_{t-1} | x0) (Algorithm 1, line 5): with a denoiser predicting 0 and x0 = 0 everywhere,
    the known region of each step's output is pure noise of variance 1 - alpha_bar at that level."""

    class Zero(nn.Module):
        def forward(self, x, t, cond=None):
            return torch.zeros_like(x)

    diffusion = GaussianDiffusion(linear_betas(100))
    den = Denoiser(Zero(), diffusion, "x0")
    ts = make_timesteps(100, 10, "trailing")
    keep = left_half(8)
    g = torch.Generator().manual_seed(0)
    steps = list(
        repaint_sample_progressive(
            den,
            torch.randn(4000, 1, 8, 8, generator=g),
            ts,
            x0=torch.zeros(1, 1, 8, 8),
            keep=keep,
            generator=g,
            jump_length=1,
            jump_n_sample=1,
            clip_x0=False,
        )
    )
    alpha_bar_next = list(diffusion.alpha_bar[ts[1:]].double()) + [torch.tensor(1.0, dtype=torch.float64)]
    for step, a in zip(steps, alpha_bar_next, strict=True):
        var = step.x[:, :, :, 4:].var().item()  # known half
        assert abs(var - (1 - a.item())) < 0.03 + 0.05 * (1 - a.item()), (step.t, var, 1 - a.item())


class MixtureOracle(nn.Module):
    """x0 prediction E[x0 | x_t] for data uniform over a few images: the exact optimal denoiser."""

    def __init__(self, images, alpha_bar):
        super().__init__()
        self.images, self.alpha_bar = images.flatten(1), alpha_bar

    def forward(self, x_t, t, cond=None):
        ab = self.alpha_bar[t].view(-1, 1)
        d2 = ((x_t.flatten(1)[:, None] - ab.sqrt()[:, None] * self.images[None]) ** 2).sum(-1)  # [B,K]
        return (torch.softmax(-d2 / (2 * (1 - ab)), 1) @ self.images).view_as(x_t)


def test_resampling_harmonises_an_exact_oracle():
    """Data: three 8x8 images, A (left +, right -), B (all +), C (left -, right +). Knowing the two leftmost columns
    of A (all +) leaves A and B equally likely, so a correct inpainter completes A half of the time. Plain
    replacement (j = r = 1) is biased: trajectories heading for C get a + left edge pasted in and end as B. RePaint's
    resampling removes most of that bias (paper, Sec. 4.2)."""
    diffusion = GaussianDiffusion(linear_betas(1000))
    A = torch.full((1, 8, 8), 0.8)
    A[:, :, 4:] = -0.8
    images = torch.stack([A, torch.full((1, 8, 8), 0.8), -A])
    den = Denoiser(MixtureOracle(images, diffusion.alpha_bar), diffusion, "x0")
    keep = torch.zeros(8, 8)
    keep[:, :2] = 1
    ts = make_timesteps(1000, 25, "trailing")

    def share_of_A(j, r, n=300):
        g = torch.Generator().manual_seed(0)
        x = repaint_sample(
            den,
            torch.randn(n, 1, 8, 8, generator=g),
            ts,
            x0=A[None],
            keep=keep,
            generator=g,
            jump_length=j,
            jump_n_sample=r,
        )
        right = x[:, 0, :, 4:].mean((1, 2))
        assert ((right.abs() - 0.8).abs() < 0.05).all()  # every completion is one of the data images
        return (right < 0).float().mean().item()

    plain, resampled = share_of_A(1, 1), share_of_A(5, 5)
    sd = (0.25 / 300) ** 0.5
    assert plain < 0.5 - 3 * sd, plain
    assert abs(resampled - 0.5) < 3 * sd, resampled


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("size", [8, 28, 32])
def test_mask_presets_have_the_stated_shapes(size):
    lh = left_half(size)
    assert lh.shape == (size, size) and (lh[:, : size // 2] == 0).all() and (lh[:, size // 2 :] == 1).all()
    cs = centre_square(size)
    rows, cols = torch.nonzero(cs == 0, as_tuple=True)
    side = size // 2
    assert (
        (cs == 0).sum() == side * side and rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
    )
    assert rows.min() + rows.max() == size - 1 == cols.min() + cols.max()  # centred
    strokes = [random_strokes(size, torch.Generator().manual_seed(s)) for s in range(20)]
    holes = torch.stack([1 - m for m in strokes]).mean((1, 2))
    assert ((holes > 0.05) & (holes < 0.8)).all() and 0.2 < holes.mean() < 0.55, holes
    assert torch.equal(strokes[0], random_strokes(size, torch.Generator().manual_seed(0)))  # reproducible
    assert not torch.equal(strokes[0], strokes[1])
    for m in [lh, cs, *strokes]:
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert left_half((6, 10)).shape == (6, 10) and (left_half((6, 10))[:, :5] == 0).all()


def test_mask_files_and_bad_masks(tmp_path):
    img = np.zeros((16, 16), np.uint8)
    img[:, 8:] = 255  # white = known: the right half
    Image.fromarray(img).save(tmp_path / "m.png")
    assert torch.equal(load_mask(tmp_path / "m.png", 8), left_half(8))  # resized nearest-neighbour
    assert torch.equal(make_mask(str(tmp_path / "m.png"), 8), left_half(8))
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(ConfigError, match="nothing to inpaint"):
        make_mask(str(tmp_path / "white.png"), 8)
    with pytest.raises(ConfigError, match="neither a preset"):
        make_mask("top_half", 8)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot read"):
        make_mask(str(tmp_path / "junk.png"), 8)
    assert set(PRESETS) == {"left_half", "centre_square", "random_strokes"}


# ------------------------------------------------------------------ sample.py
INPAINT = ["num_samples=3", "inpaint.num_steps=10", "inpaint.jump_length=2", "inpaint.jump_n_sample=2"]


def test_sample_inpaints_a_dataset_image(tiny_ckpt, tmp_path):
    cfg = compose_cfg(
        "sample", [f"ckpt_path={tiny_ckpt}", "inpaint.index=5", "inpaint.mask=centre_square", *INPAINT], tmp_path
    )
    out = sample(cfg, tmp_path)
    npz = np.load(out / "samples.npz")
    images, original, keep = npz["images"], npz["original"], npz["keep"]
    assert images.shape == (3, 8, 8, 1) and original.shape == (8, 8, 1) and keep.shape == (8, 8)
    assert (images[:, keep] == original[keep]).all()  # known pixels kept exactly
    assert not (images[:, ~keep] == original[~keep]).all()
    from ddpmlab.data import DiffusionDataModule

    dm = DiffusionDataModule("digits")
    dm.setup("fit")
    assert np.array_equal(original[..., 0], to_uint8(dm.val_set[5][0])[0].numpy())  # the validation image number 5
    w, h = Image.open(out / "inpaint.png").size
    assert (w, h) == (5 * 66 + 2, 66 + 2)  # masked input | 3 completions | original, 8x8 enlarged 8x, 2 px padding


def test_sample_cli_inpaints_an_image_file_with_a_mask_file(tiny_ckpt, tmp_path):
    Image.fromarray(np.tile(np.linspace(0, 255, 20).astype(np.uint8), (20, 1))).save(tmp_path / "img.png")
    mask = np.full((8, 8), 255, np.uint8)
    mask[2:5, 2:6] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = run_cli(
        "sample.py",
        f"ckpt_path={tiny_ckpt}",
        f"inpaint.image={tmp_path / 'img.png'}",
        f"inpaint.mask={tmp_path / 'mask.png'}",
        *INPAINT,
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    npz = np.load(tmp_path / "out" / "samples.npz")
    assert npz["keep"].sum() == 64 - 12 and (tmp_path / "out" / "inpaint.png").is_file()
    assert np.diff(npz["original"][0, :, 0].astype(int)).min() >= 0  # the gradient image, resized to 8x8
    with pytest.raises(ConfigError, match="inpaint.index=100000 is not an image"):
        sample(
            compose_cfg("sample", [f"ckpt_path={tiny_ckpt}", "inpaint.index=100000", *INPAINT], tmp_path / "bad"),
            tmp_path / "bad",
        )


def test_q_step_composes_to_the_closed_form():
    """RePaint's jumps back use one forward step at a time, DDPM eq. (2); T of them give eq. (4)'s moments."""
    diffusion = GaussianDiffusion(linear_betas(100))
    g = torch.Generator().manual_seed(0)
    x = torch.full((20_000, 1, 2, 2), 0.5)
    for t in range(100):
        x = diffusion.q_step(x, torch.full((len(x),), t), torch.randn(x.shape, generator=g))
        if t in (0, 9, 49, 99):
            assert abs(x.mean().item() - 0.5 * diffusion.sqrt_alpha_bar[t].item()) < 0.015  # 4 sd of the mean
            assert abs(x.var().item() / (1 - diffusion.alpha_bar[t].item()) - 1) < 0.03  # 6 sd of the variance ratio


# ------------------------------------------------------------------ RePaint through Sampler
def test_repaint_is_a_sampler_with_every_spacing_and_the_same_validation():
    den = Denoiser(
        UNet(
            in_channels=1,
            image_size=8,
            base_channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(),
            num_groups=8,
        ),
        GaussianDiffusion(linear_betas(50)),
    ).eval()
    x0, keep = torch.zeros(1, 1, 8, 8), left_half(8)
    for spacing in ("leading", "trailing", "linspace", "quadratic", "logsnr"):
        sampler = Sampler("repaint", 10, spacing, jump_length=2, jump_n_sample=2)
        grid = make_timesteps(50, 10, spacing, den.diffusion.alpha_bar64)
        assert sampler.timesteps(den.diffusion).tolist() == grid.tolist()
        g = torch.Generator().manual_seed(0)
        x = sampler(den, torch.randn(2, 1, 8, 8), x0=x0, keep=keep, generator=g)
        assert torch.equal(x[..., 4:], x0.expand(2, -1, -1, -1)[..., 4:])  # known pixels kept exactly
    assert Sampler("repaint", 10, jump_length=2, jump_n_sample=2).num_evaluations(den.diffusion) == len(
        [1 for k, k_next in itertools.pairwise(repaint_schedule(10, 2, 2)) if k_next < k]
    )
    with pytest.raises(ConfigError, match="inpaint.num_steps=250 is more than the schedule's T=50"):  # no clamp
        Sampler("repaint", 250, "trailing")(den, torch.randn(1, 1, 8, 8), x0=x0, keep=keep)
    with pytest.raises(ConfigError, match="inpaint.jump_length=10 must be smaller than the grid's 10 steps"):
        Sampler("repaint", 10, jump_length=10, jump_n_sample=2).num_evaluations(den.diffusion)
    for bad in ({"variance": "medium"}, {"jump_length": 0}, {"eta": 0.5}):
        with pytest.raises(ConfigError):
            Sampler("repaint", 10, **bad)


def test_sample_inpaints_on_a_logsnr_grid_and_saves_the_sampler(tiny_ckpt, tmp_path):
    over = [f"ckpt_path={tiny_ckpt}", "inpaint.index=1", "inpaint.spacing=logsnr", *INPAINT]
    cfg = compose_cfg("sample", over, tmp_path)
    out = sample(cfg, tmp_path)
    npz = np.load(out / "samples.npz")
    assert (npz["images"][:, npz["keep"]] == npz["original"][npz["keep"]]).all()
    saved = OmegaConf.load(out / "sampler.yaml")
    assert (saved.algorithm, saved.spacing, saved.num_steps, saved.jump_length) == ("repaint", "logsnr", 10, 2)
    with pytest.raises(ConfigError, match="inpaint.num_steps=51 is more than the schedule's T=50"):
        over = [f"ckpt_path={tiny_ckpt}", "inpaint.index=1", "inpaint.num_steps=51"]
        sample(compose_cfg("sample", over, tmp_path / "b"), tmp_path / "b")
