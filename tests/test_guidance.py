"""Classifier-free guidance (Ho & Salimans 2022): the guided denoiser, condition dropout, the CLI and the grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose_cfg, run_cli, tiny_denoiser
from ddpmlab.cli.sample import sample
from ddpmlab.conditioning import NULL_LABEL
from ddpmlab.diffusion import Prediction
from ddpmlab.errors import ConfigError
from ddpmlab.lit.module import DiffusionModule
from ddpmlab.objectives import SimpleLoss
from ddpmlab.samplers import ALGORITHMS, Sampler
from ddpmlab.samplers.guidance import GuidedDenoiser, cycle_labels, with_guidance
from ddpmlab.training import train

K = 4  # classes of the toy model


def conditional_denoiser(prediction="eps", seed=0, num_classes=K):
    return tiny_denoiser(50, num_classes=num_classes, prediction=prediction, seed=seed)


class SeparateForwards(torch.nn.Module):
    """Eq. (6) from two separate network calls: the reference the batched GuidedDenoiser must match."""

    def __init__(self, denoiser, w):
        super().__init__()
        self.denoiser, self.w, self.net, self.diffusion = denoiser, w, denoiser.net, denoiser.diffusion

    def forward(self, x_t, t, cond=None):
        eps_c = self.denoiser(x_t, t, cond).eps_hat
        eps_u = self.denoiser(x_t, t, torch.full_like(cond, self.net.num_classes)).eps_hat
        eps = (1 + self.w) * eps_c - self.w * eps_u
        return Prediction(eps, self.diffusion.x0_from_eps(x_t, t, eps))


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
    torch.testing.assert_close(pred.x0_hat, ref.x0_hat, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(pred.eps_hat, 4 * eps_c - 3 * eps_u, atol=2e-5, rtol=1e-5)
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
