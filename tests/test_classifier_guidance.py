"""Classifier guidance (Dhariwal & Nichol 2021): Algorithms 1 and 2 on a toy whose classifier gradient is analytic
(two Gaussian classes), and the noisy classifier's training and sampling commands."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY, TINY_CLASSIFIER, compose_cfg, run_cli
from ddpmlab.cli.sample import sample
from ddpmlab.diffusion import Denoiser, GaussianDiffusion, linear_betas, make_timesteps
from ddpmlab.diffusion.parameterization import Prediction
from ddpmlab.errors import ConfigError
from ddpmlab.samplers import Sampler, ddpm_sample_progressive
from ddpmlab.samplers.base import predict
from ddpmlab.samplers.classifier_guidance import ClassifierGuidedDenoiser
from ddpmlab.training import train

T, M, S = 100, 1.0, 0.5  # classes N(-M, S^2) and N(+M, S^2) per dimension, equally likely


def toy_moments(diffusion, t):
    alpha_bar = diffusion.alpha_bar.double()[t].view(-1, 1, 1, 1)
    return alpha_bar.sqrt(), alpha_bar * S**2 + 1 - alpha_bar  # x_t | y ~ N(sqrt(ab) mu_y, ab S^2 + 1 - ab)


def class_log_lik(diffusion, x, t):
    """log q(x_t | y) for y = 0, 1, summed over dimensions: [B, 2], float64."""
    scale, var = toy_moments(diffusion, t)
    return torch.stack([(-((x.double() - scale * mu) ** 2) / (2 * var)).flatten(1).sum(1) for mu in (-M, M)], 1)


class ToyClassifier(nn.Module):
    """The exact p(y | x_t) of the toy (logits = class log-likelihoods)."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x, t):
        return class_log_lik(self.diffusion, x, t).to(x.dtype)


class ToyOracle(nn.Module):
    """The optimal eps of the toy mixture: eps = -sqrt(1 - alpha_bar) grad log q(x_t)."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x, t):
        scale, var = toy_moments(self.diffusion, t)
        w = torch.softmax(class_log_lik(self.diffusion, x, t), 1)  # p(y | x_t)
        score = sum(w[:, k].view(-1, 1, 1, 1) * -(x.double() - scale * mu) / var for k, mu in enumerate((-M, M)))
        return (-(1 - self.diffusion.alpha_bar.double()[t]).sqrt().view(-1, 1, 1, 1) * score).float()


def analytic_grad(diffusion, x, t, y):
    """grad_x log p(y | x_t) = grad log q(x_t | y) - sum_k p(k | x_t) grad log q(x_t | k)."""
    scale, var = toy_moments(diffusion, t)
    w = torch.softmax(class_log_lik(diffusion, x, t), 1)
    grads = [-(x.double() - scale * mu) / var for mu in (-M, M)]
    mixed = sum(w[:, k].view(-1, 1, 1, 1) * g for k, g in enumerate(grads))
    return torch.where(y.view(-1, 1, 1, 1) == 1, grads[1], grads[0]) - mixed


@pytest.fixture
def toy():
    diffusion = GaussianDiffusion(linear_betas(T))
    return diffusion, Denoiser(ToyOracle(diffusion), diffusion), ToyClassifier(diffusion)


def test_ancestral_mean_shifts_by_s_sigma_grad_log_p(toy):  # Algorithm 1
    diffusion, den, clf = toy
    x = torch.randn(64, 1, 1, 2, generator=torch.Generator().manual_seed(0)) * 0.7
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    for num_steps in (None, 10):
        ts = make_timesteps(T, num_steps, "leading")
        kwargs = dict(generator=torch.Generator().manual_seed(2), clip_x0=False, cond=y)
        plain = next(ddpm_sample_progressive(ClassifierGuidedDenoiser(den, clf, 0.0), x, ts, **kwargs)).x
        kwargs["generator"] = torch.Generator().manual_seed(2)
        guided = next(ddpm_sample_progressive(ClassifierGuidedDenoiser(den, clf, 2.0), x, ts, **kwargs)).x
        process = diffusion.respace(ts)
        sigma2 = process.beta_tilde.double()[-1]  # the first step is the respaced process's last index
        expected = 2.0 * sigma2 * analytic_grad(diffusion, x, torch.full((64,), int(ts[0])), y)
        torch.testing.assert_close((guided - plain).double(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_the_last_ancestral_step_shifts_by_the_unclipped_variance(toy, variance):
    """Algorithm 1 at t = 1: Sigma_1 = beta_tilde_1 = 0 with the small variance, so the guided mean is the model's
    own there (guided-diffusion's condition_mean reads the unclipped posterior_variance); the large variance at
    index 0 is beta_tilde of index 1 (as improved-diffusion), and the shift follows it."""
    from ddpmlab.samplers.ddpm import ddpm_step

    diffusion, _, _ = toy
    g = torch.Generator().manual_seed(4)
    x_t, x0_hat, grad = (torch.randn(8, 1, 1, 2, generator=g) for _ in range(3))
    j = torch.zeros(8, dtype=torch.long)
    plain = Prediction(torch.zeros_like(x_t), x0_hat)
    mean = ddpm_step(plain, diffusion, x_t, j, None, variance)
    guided_mean = ddpm_step(plain._replace(guide_grad=grad), diffusion, x_t, j, None, variance)
    sigma2 = 0.0 if variance == "small" else float(diffusion.beta_tilde[1])
    torch.testing.assert_close(guided_mean - mean, sigma2 * grad)
    if variance == "small":
        assert torch.equal(guided_mean, mean)
    # The likelihood still sees a finite, clipped log-variance at index 0.
    p = diffusion.p_mean_variance(x0_hat, x_t, j, variance)
    assert torch.isfinite(p.log_variance).all()
    torch.testing.assert_close(p.log_variance, diffusion.beta_tilde[1].log().expand(8, 1, 1, 1))


def test_ddim_eps_shifts_by_sqrt_one_minus_alpha_bar_s_grad(toy):  # Algorithm 2
    diffusion, den, clf = toy
    x = torch.randn(32, 1, 1, 2, generator=torch.Generator().manual_seed(3))
    y = torch.ones(32, dtype=torch.long)
    t = 40
    plain = predict(den, x, t, None, clip_x0=False)
    guided = predict(ClassifierGuidedDenoiser(den, clf, 3.0), x, t, y, clip_x0=False)
    shift = (1 - diffusion.alpha_bar.double()[t]).sqrt() * 3.0 * analytic_grad(diffusion, x, torch.full((32,), t), y)
    torch.testing.assert_close(guided.eps_hat.double(), plain.eps_hat.double() - shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided.x0_hat, diffusion.x0_from_eps(x, torch.full((32,), t), guided.eps_hat))
    assert guided.guide_grad is None  # used up: a sampler cannot apply it twice


@pytest.mark.parametrize("algorithm,steps", [("ddpm", None), ("ddim", 20)])
def test_guided_sampling_moves_mass_to_the_requested_class(toy, algorithm, steps):
    diffusion, den, clf = toy
    x_T = torch.randn(400, 1, 1, 2, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(400, dtype=torch.long)  # ask for class 0 (mean -M)
    share = {}
    for s in (0.0, 4.0):
        sampler = Sampler(algorithm, steps, clip_x0=False)
        guided = ClassifierGuidedDenoiser(den, clf, s)
        x0 = sampler(guided, x_T, generator=torch.Generator().manual_seed(5), cond=y)
        share[s] = float((x0.flatten(1).mean(1) < 0).float().mean())
    assert 0.35 < share[0.0] < 0.65  # unguided: the mixture, half and half
    assert share[4.0] > 0.95


def test_guidance_needs_labels(toy):
    diffusion, den, clf = toy
    with pytest.raises(ConfigError, match="one class label per sample"):
        ClassifierGuidedDenoiser(den, clf, 1.0)(torch.zeros(2, 1, 1, 2), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("guidance")
    metrics = train(compose_cfg("train", TINY_CLASSIFIER, root / "classifier"))
    (root / "diffusion").symlink_to(tiny_ckpt.parent.parent)  # the session's tiny run, read only
    return root, metrics


def test_classifier_training_logs_accuracy_by_t(runs):
    root, metrics = runs
    assert {"val/acc_t0", "val/acc_t12", "val/acc_t25", "val/acc_t37", "val/acc_t47"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in metrics if k.startswith("val/acc"))
    ckpt = torch.load(root / "classifier" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ddpmlab_config"]["model"]["_target_"] == "ddpmlab.networks.NoisyClassifier"


def test_sample_with_a_classifier(runs, tmp_path):
    root, _ = runs
    cfg = compose_cfg("sample", [
        f"ckpt_path={root / 'diffusion' / 'checkpoints' / 'last.ckpt'}", "num_samples=6", "labels=[3,7]",
        f"classifier.ckpt_path={root / 'classifier' / 'checkpoints' / 'last.ckpt'}", "classifier.scale=2",
        "sampler=ddim", "sampler.num_steps=5",
    ], tmp_path)  # fmt: skip
    out = sample(cfg, tmp_path / "out")
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (6, 8, 8, 1) and npz["labels"].tolist() == [3, 7, 3, 7, 3, 7]


def test_a_mismatched_classifier_is_refused_with_both_shown(runs, tmp_path):
    root, _ = runs
    r = run_cli(
        "sample.py", f"ckpt_path={root / 'diffusion' / 'checkpoints' / 'last.ckpt'}", "num_samples=2",
        f"classifier.ckpt_path={root / 'classifier' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr  # same schedule and size: accepted
    other = compose_cfg("train", TINY + ["schedule.num_timesteps=40"], root / "other")
    train(other)
    r = run_cli(
        "sample.py", f"ckpt_path={root / 'other' / 'checkpoints' / 'last.ckpt'}", "num_samples=2",
        f"classifier.ckpt_path={root / 'classifier' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2
    assert "ddpmlab: error:" in r.stderr and "'num_timesteps': 50" in r.stderr and "'num_timesteps': 40" in r.stderr


def test_a_diffusion_checkpoint_as_classifier_is_refused(runs, tmp_path):
    root, _ = runs
    diffusion = root / "diffusion" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("sample", [f"ckpt_path={diffusion}", f"classifier.ckpt_path={diffusion}"], tmp_path)
    with pytest.raises(ConfigError, match="not a noisy-classifier checkpoint"):
        sample(cfg, tmp_path / "out")


def test_a_resumed_classifier_run_is_the_straight_run_bit_for_bit(tmp_path):
    """The classifier draws its t and noise (and dropout) per step from (seed, rank, step), as the diffusion module."""
    # 12 batches of 128 per epoch of the digits' training split: 9 + 9 steps cross an epoch boundary
    args = [o for o in TINY_CLASSIFIER if not o.startswith(("trainer.max_steps", "data.batch_size"))]
    args += ["data.batch_size=128", "model.dropout=0.3", "callbacks.checkpoint.every_n_train_steps=4"]
    train(compose_cfg("train", [*args, "trainer.max_steps=9"], tmp_path / "a"))
    train(compose_cfg("train", [*args, "trainer.max_steps=18", "ckpt_path=last"], tmp_path / "a"))
    train(compose_cfg("train", [*args, "trainer.max_steps=18"], tmp_path / "b"))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 18
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{k} differs"
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_a_classifier_export_gives_the_checkpoints_logits(runs, tmp_path):
    from ddpmlab import load
    from ddpmlab.api import classifier_from_checkpoint, load_checkpoint
    from ddpmlab.cli.export import export

    root, _ = runs
    ckpt = root / "classifier" / "checkpoints" / "last.ckpt"
    out = export(ckpt, tmp_path / "export")
    assert "| stage | noisy classifier |" in (out / "README.md").read_text()
    from_ckpt, _ = load(ckpt)
    from_export, cfg = load(out)
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 25, 49])
    with torch.no_grad():
        logits = from_export(x, t)
        assert torch.equal(from_ckpt(x, t), logits) and logits.shape == (4, 10)
    guide, _, _ = classifier_from_checkpoint(load_checkpoint(ckpt))  # what classifier guidance uses
    with torch.no_grad():
        assert torch.equal(guide(x, t), logits)
