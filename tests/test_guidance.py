"""Classifier-free guidance (Ho & Salimans 2022): the guided denoiser, condition dropout, the CLI and the grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose_cfg, run_cli, tiny_denoiser
from ddpmlab.cli.sample import sample
from ddpmlab.conditioning import NULL_LABEL
from ddpmlab.diffusion import Denoiser, GaussianDiffusion, Prediction, linear_betas
from ddpmlab.errors import ConfigError
from ddpmlab.lit.module import DiffusionModule
from ddpmlab.objectives import SimpleLoss
from ddpmlab.samplers import ALGORITHMS, Sampler
from ddpmlab.samplers.guidance import GuidedDenoiser, cycle_labels, with_guidance
from ddpmlab.training import train
from ddpmlab.validate import check_sample_config

K = 4  # classes of the toy model


def conditional_denoiser(prediction="eps", seed=0, num_classes=K):
    return tiny_denoiser(50, num_classes=num_classes, prediction=prediction, seed=seed)


class SeparateForwards(torch.nn.Module):
    """Eq. (6) from two separate network calls: the reference the batched GuidedDenoiser must match."""

    def __init__(self, denoiser, w):
        super().__init__()
        self.denoiser, self.w, self.net, self.diffusion = denoiser, w, denoiser.net, denoiser.diffusion

    def forward(self, x_t, t, cond=None):
        c = self.denoiser(x_t, t, cond)
        u = self.denoiser(x_t, t, torch.full_like(cond, self.net.num_classes))
        return Prediction((1 + self.w) * c.eps_hat - self.w * u.eps_hat, (1 + self.w) * c.x0_hat - self.w * u.x0_hat)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_one_batched_forward_equals_two_separate_forwards(prediction):
    den = conditional_denoiser(prediction)
    guided = GuidedDenoiser(den, w=3.0)
    g = torch.Generator().manual_seed(1)
    x_t, t, cond = torch.randn(5, 1, 8, 8, generator=g), torch.tensor([0, 7, 20, 33, 49]), torch.tensor([0, 1, 2, 3, 1])
    calls = []
    hook = den.net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        pred = guided(x_t, t, cond)
    hook.remove()
    assert calls == [10]  # one forward over [cond; null]
    with torch.no_grad():
        ref = SeparateForwards(den, 3.0)(x_t, t, cond)
        eps_c, eps_u = den(x_t, t, cond).eps_hat, den(x_t, t, None).eps_hat  # labels=None is the null label
    torch.testing.assert_close(pred.eps_hat, ref.eps_hat, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(pred.x0_hat, ref.x0_hat, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(pred.eps_hat, 4 * eps_c - 3 * eps_u, atol=2e-5, rtol=1e-5)
    # the guided pair is one consistent prediction: eps_hat read back from x0_hat (DDPM eq. 4)
    torch.testing.assert_close(den.diffusion.eps_from_x0(x_t, t, pred.x0_hat), pred.eps_hat, atol=1e-4, rtol=1e-4)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the label matters, so the comparison above has teeth


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_w0_is_the_conditional_models_own_sampling(algorithm):
    den = conditional_denoiser()
    sampler = Sampler(algorithm, num_steps=6)
    cond = torch.tensor([0, 1, 2, 3, 0, 1])

    def run(d):
        g = torch.Generator().manual_seed(3)
        return sampler(d, torch.randn(6, 1, 8, 8, generator=g), generator=g, cond=cond)

    plain, w0, w2 = run(den), run(GuidedDenoiser(den, 0.0)), run(GuidedDenoiser(den, 2.0))
    assert torch.equal(plain, w0)
    assert (w2 - plain).abs().max() > 1e-3  # guidance changes the samples
    torch.testing.assert_close(w2, run(SeparateForwards(den, 2.0)), atol=1e-4, rtol=1e-4)  # every sampler, unchanged


def test_guidance_refuses_an_unconditional_model_and_a_negative_weight():
    with pytest.raises(ConfigError, match="needs a conditional model"):
        GuidedDenoiser(conditional_denoiser(num_classes=None), 1.0)
    with pytest.raises(ConfigError, match=">= 0"):
        GuidedDenoiser(conditional_denoiser(), -1.0)


# ---------------------------------------------------------------------------------------------- guidance rescale
def guided_outputs(prediction, rescale, w=3.0, schedule=None):
    """(the guided output, the conditional output), each in what the network predicts, at a few (x_t, t)."""
    den = conditional_denoiser(prediction)
    if schedule is not None:
        den = Denoiser(den.net, schedule, prediction).eval()
    g = torch.Generator().manual_seed(1)
    x_t, t, cond = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 20, 35, 49]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        pred, pos = GuidedDenoiser(den, w, rescale=rescale)(x_t, t, cond), den(x_t, t, cond)
    return den.output_of(pred, x_t, t), den.output_of(pos, x_t, t), pred, SeparateForwards(den, w)(x_t, t, cond)


def per_sample_std(x):
    return x.flatten(1).std(1)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guidance_rescale_phi0_is_plain_guidance_and_phi1_keeps_the_conditional_std(prediction):
    plain, pos, pred, ref = guided_outputs(prediction, 0.0)
    torch.testing.assert_close(pred.eps_hat, ref.eps_hat, atol=2e-5, rtol=1e-5)  # eq. 6, untouched
    torch.testing.assert_close(pred.x0_hat, ref.x0_hat, atol=2e-5, rtol=1e-5)
    assert (per_sample_std(plain) / per_sample_std(pos) - 1).abs().min() > 0.05  # guidance changed the std
    full, _, _, _ = guided_outputs(prediction, 1.0)
    torch.testing.assert_close(per_sample_std(full), per_sample_std(pos), atol=0, rtol=1e-5)  # Lin et al. eq. 15
    factor = (per_sample_std(pos) / per_sample_std(plain)).view(-1, 1, 1, 1)
    torch.testing.assert_close(full, factor * plain, atol=1e-5, rtol=1e-5)  # x_cfg scaled, nothing else
    half, _, _, _ = guided_outputs(prediction, 0.5)
    torch.testing.assert_close(half, (full + plain) / 2, atol=1e-5, rtol=1e-5)  # eq. 16: linear in phi


def test_guidance_rescale_agrees_with_diffusers():
    sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    plain, pos, _, _ = guided_outputs("v", 0.0)
    ours, _, _, _ = guided_outputs("v", 0.7)
    torch.testing.assert_close(ours, sd.rescale_noise_cfg(plain, pos, guidance_rescale=0.7), atol=1e-5, rtol=1e-5)


def test_guidance_rescale_outside_0_1_is_refused_in_one_line(tmp_path):
    den = conditional_denoiser()
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match=r"guidance_rescale=.* must be a number in \[0, 1\]") as e:
            GuidedDenoiser(den, 3.0, rescale=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"must be a number in \[0, 1\]"):
        with_guidance(den, None, 3.0, 4, rescale=2.0)
    assert with_guidance(den, None, 3.0, 4, rescale=0.7)[1].rescale == 0.7
    cfg = compose_cfg("sample", ["ckpt_path=x.ckpt", "guidance_rescale=1.5"], tmp_path)
    with pytest.raises(ConfigError, match=r"guidance_rescale=1.5 is outside \[0, 1\]"):
        check_sample_config(cfg)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_is_finite_where_the_snr_is_zero(rescale):
    zero_snr = GaussianDiffusion(linear_betas(50, zero_terminal_snr=True))
    _, _, pred, ref = guided_outputs("v", rescale, schedule=zero_snr)
    assert torch.isfinite(pred.x0_hat).all() and torch.isfinite(pred.eps_hat).all()
    if rescale == 0:
        torch.testing.assert_close(pred.x0_hat, ref.x0_hat, atol=2e-5, rtol=1e-5)


def test_labels_cycle_and_are_checked():
    assert cycle_labels([0, 1, 2], 10, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert cycle_labels(None, 3, 5).tolist() == [0, 1, 2, 0, 1]
    assert cycle_labels(4, 10, 2).tolist() == [4, 4]
    for bad in ([10], [-1], [], [1.5], ["a"]):
        with pytest.raises(ConfigError, match="labels"):
            cycle_labels(bad, 10, 4)


@pytest.mark.parametrize("p_uncond", [0.1, 0.3])
def test_the_null_label_is_used_at_the_rate_p_uncond(p_uncond):
    module = DiffusionModule(conditional_denoiser(num_classes=10), SimpleLoss(), torch.optim.Adam, p_uncond=p_uncond)
    y = torch.randint(0, 10, (40_000,), generator=torch.Generator().manual_seed(0))
    x0 = torch.zeros(len(y), 1, 2, 2)
    out = module.condition((x0, y), torch.Generator().manual_seed(1), train=True).labels
    dropped = out == NULL_LABEL
    sd = (p_uncond * (1 - p_uncond) / len(y)) ** 0.5
    assert abs(dropped.float().mean().item() - p_uncond) < 5 * sd
    assert torch.equal(out[~dropped], y[~dropped])  # the rest keep their own label
    # dropout is independent of the class: each class is dropped at the same rate
    per_class = torch.stack([dropped[y == c].float().mean() for c in range(10)])
    assert (per_class - p_uncond).abs().max() < 5 * (p_uncond * (1 - p_uncond) / 3000) ** 0.5
    assert torch.equal(module.condition((x0, y), None, train=False).labels, y)  # validation: no dropout
    module.p_uncond = 0.0
    assert torch.equal(module.condition((x0, y), None, train=True).labels, y)
    unconditional = DiffusionModule(conditional_denoiser(num_classes=None), SimpleLoss(), torch.optim.Adam)
    assert unconditional.condition((x0, y), None, train=True) is None


# ------------------------------------------------------------------ through train(cfg) and sample.py
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cond")
    train(compose_cfg("train", TINY + ["model.num_classes=10", "callbacks.sample_grid.num_samples=20"], run))
    return run


def test_the_grid_callback_draws_one_row_per_class(cond_run):
    grids = sorted((cond_run / "grids").glob("*.png"))
    assert grids
    w, h = Image.open(grids[-1]).size
    cell = 32 + 2  # 8x8 digits enlarged 4x, 2 px padding (ddpmlab.images)
    assert (w, h) == (2 * cell + 2, 10 * cell + 2)  # 20 samples: 10 rows (classes) of 2


def test_sample_cli_draws_the_requested_labels_with_guidance(cond_run, tmp_path):
    ckpt = cond_run / "checkpoints" / "last.ckpt"
    r = run_cli(
        "sample.py",
        f"ckpt_path={ckpt}",
        "num_samples=7",
        "labels=[0,1,2]",
        "guidance=3.0",
        "sampler=ddim",
        "sampler.num_steps=4",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    npz = np.load(tmp_path / "out" / "samples.npz")
    assert npz["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0] and npz["images"].shape == (7, 8, 8, 1)
    with pytest.raises(ConfigError, match="labels must lie in 0..9"):  # the CLI prints it as one line, exit 2
        sample(
            compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=2", "labels=[12]"], tmp_path / "bad"),
            tmp_path / "bad",
        )


def test_guidance_changes_samples_and_w0_matches_the_unguided_cli(cond_run, tmp_path):
    ckpt = cond_run / "checkpoints" / "last.ckpt"

    def images(*extra):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        cfg = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=6", "sampler.num_steps=5", *extra], out)
        return np.load(sample(cfg, out) / "samples.npz")

    base, w0, w3 = images(), images("guidance=0.0", "labels=[0,1,2,3,4,5,6,7,8,9]"), images("guidance=3.0")
    assert base["labels"].tolist() == [0, 1, 2, 3, 4, 5]  # null labels: every class in turn
    assert np.array_equal(base["images"], w0["images"]) and not np.array_equal(base["images"], w3["images"])
    assert not np.array_equal(images("guidance=3.0", "guidance_rescale=0.7")["images"], w3["images"])


def test_labels_or_guidance_on_an_unconditional_model_are_refused():
    den = conditional_denoiser(num_classes=None)
    assert with_guidance(den, None, 0.0, 3) == (None, den)
    for labels, w in (([1], 0.0), (None, 1.0)):
        with pytest.raises(ConfigError, match="unconditional"):
            with_guidance(den, labels, w, 3)


def test_a_conditional_checkpoint_inpaints_towards_the_requested_label(cond_run, tmp_path):
    ckpt = cond_run / "checkpoints" / "last.ckpt"
    over = [
        f"ckpt_path={ckpt}",
        "inpaint.index=0",
        "num_samples=2",
        "inpaint.num_steps=8",
        "inpaint.jump_length=2",
        "inpaint.jump_n_sample=2",
    ]
    npz = np.load(
        sample(compose_cfg("sample", over + ["labels=[3]", "guidance=2.0"], tmp_path / "a"), tmp_path / "a")
        / "samples.npz"
    )
    keep = npz["keep"]
    assert npz["labels"].tolist() == [3, 3] and (npz["images"][:, keep] == npz["original"][keep]).all()
    assert "labels" not in np.load(
        sample(compose_cfg("sample", over, tmp_path / "b"), tmp_path / "b") / "samples.npz"
    )  # null label
    with pytest.raises(ConfigError, match="needs labels"):
        sample(compose_cfg("sample", over + ["guidance=2.0"], tmp_path / "c"), tmp_path / "c")
