"""evaluate.py metrics=[inpaint] (hole MSE, PSNR, SSIM against the originals) and metrics=[guided] (agreement of a
judge with the requested labels), checked against direct computations."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, TINY_CLASSIFIER, compose_cfg, run_cli
from ddpmlab.api import load
from ddpmlab.cli.evaluate import evaluate
from ddpmlab.data.datasets import load_digits
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.image_metrics import inpainting_metrics, within_class_std
from ddpmlab.samplers import Sampler, generate
from ddpmlab.samplers.masks import make_mask


def eval_cfg(ckpt, out, *extra):
    return compose_cfg("evaluate", [f"ckpt_path={ckpt}", "batch_size=16", *extra], out)


INPAINT = ["metrics=[inpaint]", "inpaint.num_images=12", "inpaint.num_steps=10", "inpaint.jump_length=2",
           "inpaint.jump_n_sample=2"]  # fmt: skip


def held_out_digits(cfg, n):
    from ddpmlab.api import rebuild

    dm = rebuild(cfg.data, "data")
    dm.setup("fit")
    return torch.stack([dm.val_set[i][0] for i in range(n)])


def psnr_direct(a, b):  # a, b on [0, 1], per image, then the mean
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def test_inpaint_numbers_match_a_direct_computation(tiny_ckpt, tmp_path):
    result = evaluate(eval_cfg(tiny_ckpt, tmp_path, *INPAINT, "inpaint.mask=centre_square"), tmp_path)["inpaint"]
    saved = json.loads((tmp_path / "metrics.json").read_text())["inpaint"]
    assert saved == json.loads(json.dumps(result))
    # the same completions, drawn directly
    denoiser, cfg = load(tiny_ckpt)
    x0 = held_out_digits(cfg, 12)
    keep = make_mask("centre_square", 8)
    sampler = Sampler("repaint", 10, "leading", jump_length=2, jump_n_sample=2, variance="auto")
    x_hat = generate(denoiser, sampler, 12, seed=0, batch_size=16, x0=x0, keep=keep)
    a, b = ((x_hat + 1) / 2).clamp(0, 1), (x0 + 1) / 2
    hole = keep == 0
    assert result["mse_hole"] == pytest.approx(float(((a - b) ** 2)[:, :, hole].mean()), rel=1e-5)
    assert result["psnr"] == pytest.approx(psnr_direct(a, b), rel=1e-5)
    assert result["ssim"] == pytest.approx(ssim_direct(a, b), rel=1e-4)
    protocol = result["protocol"]
    assert protocol["mask"] == "centre_square" and protocol["num_images"] == 12 and protocol["seed"] == 0
    assert protocol["sampler"]["algorithm"] == "repaint" and protocol["hole_fraction"] == pytest.approx(16 / 64)
    assert "lpips" not in result


def ssim_direct(a, b, k=11, sigma=1.5):
    """Wang et al. 2004: Gaussian-weighted local means, variances and covariance, the image reflect-padded."""
    a, b = (torch.nn.functional.pad(x, (k // 2,) * 4, mode="reflect") for x in (a, b))
    g = torch.exp(-((torch.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    w = (g[:, None] * g[None]) / (g.sum() ** 2)
    conv = lambda x: torch.nn.functional.conv2d(x, w[None, None])
    mu_a, mu_b = conv(a), conv(b)
    var_a, var_b, cov = conv(a * a) - mu_a**2, conv(b * b) - mu_b**2, conv(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.flatten(1).mean(1).mean())


def test_inpainting_metrics_of_the_originals_themselves():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    keep = make_mask("left_half", 8)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    same = inpainting_metrics(x, x, keep)
    assert same["mse_hole"] == 0 and same["ssim"] == pytest.approx(1.0, abs=1e-5)
    worse = inpainting_metrics(noisy, x, keep)
    assert worse["mse_hole"] > 0 and worse["ssim"] < 0.99 and np.isfinite(worse["psnr"]) and worse["psnr"] > 0
    only_known_changed = torch.where(keep.bool(), noisy, x)
    assert inpainting_metrics(only_known_changed, x, keep)["mse_hole"] == 0  # the hole alone counts


def test_the_seed_and_the_mask_change_the_completions(tiny_ckpt, tmp_path):
    a = evaluate(eval_cfg(tiny_ckpt, tmp_path / "a", *INPAINT), tmp_path / "a")["inpaint"]
    b = evaluate(eval_cfg(tiny_ckpt, tmp_path / "b", *INPAINT, "seed=1"), tmp_path / "b")["inpaint"]
    c = evaluate(eval_cfg(tiny_ckpt, tmp_path / "c", *INPAINT, "inpaint.mask=random_strokes"), tmp_path / "c")
    assert a["mse_hole"] != b["mse_hole"] and a["protocol"]["mask"] == "left_half"
    assert c["inpaint"]["protocol"]["mask"] == "random_strokes" and c["inpaint"]["mse_hole"] != a["mse_hole"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["inpaint.num_images=500"], "validation split has 180"),
        (["inpaint.mask=nowhere.png"], "neither a preset"),
        (["inpaint.num_steps=80"], "num_steps"),
    ],
)
def test_bad_inpaint_configs_are_config_errors(tiny_ckpt, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(tiny_ckpt, tmp_path, *INPAINT, *extra), tmp_path)


def test_lpips_without_its_weights_is_a_one_line_error(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    r = run_cli(
        "evaluate.py",
        f"ckpt_path={tiny_ckpt}",
        *INPAINT,
        "inpaint.num_images=2",
        "inpaint.lpips=true",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "ddpmlab: error: LPIPS needs the VGG16 ImageNet weights" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ guided agreement
GUIDED = ["metrics=[guided]", "guided.num_samples=20", "guided.sampler.algorithm=ddim", "guided.sampler.num_steps=4"]


@pytest.fixture(scope="module")
def guided_runs(tmp_path_factory):
    """A tiny class-conditional checkpoint and a tiny noisy classifier (digits, T = 50)."""
    from ddpmlab.training import train

    root = tmp_path_factory.mktemp("guided")
    train(compose_cfg("train", [*TINY, "model.num_classes=10"], root / "cond"))
    train(compose_cfg("train", TINY_CLASSIFIER, root / "classifier"))
    return root / "cond" / "checkpoints" / "last.ckpt", root / "classifier" / "checkpoints" / "last.ckpt"


def svc_direct(cfg):
    from sklearn.svm import SVC

    from ddpmlab.api import rebuild

    dm = rebuild(cfg.data, "data")
    dm.setup("fit")
    x, y = zip(*(dm.train_set[i] for i in range(len(dm.train_set))), strict=True)

    def pixels(t):
        return (((torch.stack(list(t)).clamp(-1, 1) + 1) * 127.5).round() / 255).flatten(1).double().numpy()

    svm = SVC(kernel="rbf", C=10.0, gamma="scale").fit(pixels(x), np.array([int(v) for v in y]))
    return lambda images: svm.predict(pixels(images)), pixels


def test_guided_agreement_with_the_svc_matches_a_direct_computation(guided_runs, tmp_path):
    from ddpmlab.samplers import GuidedDenoiser

    cond, _ = guided_runs
    result = evaluate(eval_cfg(cond, tmp_path, *GUIDED, "guided.judge=svc_digits", "guided.guidance=2",
                               "guided.labels=[3,5]"), tmp_path)["guided"]  # fmt: skip
    denoiser, cfg = load(cond)
    want = torch.tensor([3, 5] * 10)
    samples = generate(GuidedDenoiser(denoiser, 2.0), Sampler.from_config(OmegaConf.to_container(cfg.sampler),
                       {"algorithm": "ddim", "num_steps": 4}), 20, seed=0, batch_size=16, labels=want)  # fmt: skip
    predict, pixels = svc_direct(cfg)
    assert result["agreement"] == pytest.approx(float((predict(samples) == want.numpy()).mean()))
    x = pixels(samples)
    spread = np.mean([x[want.numpy() == k].std(0).mean() for k in (3, 5)])
    assert result["within_class_std"] == pytest.approx(spread, rel=1e-6)
    assert result["within_class_std"] == pytest.approx(within_class_std(x, want.numpy()), rel=1e-6)
    protocol = result["protocol"]
    assert protocol["labels"] == [3, 5] and protocol["guidance"] == 2.0 and protocol["num_samples"] == 20
    assert protocol["sampler"]["algorithm"] == "ddim" and protocol["steps"] == 4 and protocol["seed"] == 0
    assert protocol["judge_heldout_accuracy"] > 0.9  # the SVM itself reads real digits
    images, labels = load_digits()  # the data module holds every digit, train and validation
    real = images.double().flatten(1).numpy() / 255
    assert protocol["real_within_class_std"] == pytest.approx(within_class_std(real, labels.numpy()), rel=1e-6)


def test_the_svc_judges_real_digits_correctly():
    from ddpmlab.metrics.image_metrics import svc_digits

    images, labels = load_digits()
    x = images.float() / 127.5 - 1
    predict = svc_digits(x[:1500], labels[:1500])
    assert (predict(x[1500:]) == labels[1500:].numpy()).mean() > 0.95


def test_guided_with_a_classifier_judge_and_classifier_guidance(guided_runs, tiny_ckpt, tmp_path):
    from ddpmlab.api import classifier_from_checkpoint, load_checkpoint
    from ddpmlab.samplers.classifier_guidance import ClassifierGuidedDenoiser

    _, classifier_ckpt = guided_runs
    result = evaluate(eval_cfg(tiny_ckpt, tmp_path, *GUIDED, f"guided.judge={classifier_ckpt}",
                               f"guided.classifier.ckpt_path={classifier_ckpt}", "guided.classifier.scale=3"),
                      tmp_path)["guided"]  # fmt: skip
    denoiser, cfg = load(tiny_ckpt)
    classifier = classifier_from_checkpoint(load_checkpoint(classifier_ckpt))[0]
    want = torch.arange(10).repeat(2)
    sampler = Sampler.from_config(OmegaConf.to_container(cfg.sampler), {"algorithm": "ddim", "num_steps": 4})
    samples = generate(ClassifierGuidedDenoiser(denoiser, classifier, 3.0), sampler, 20, seed=0, batch_size=16,
                       labels=want)  # fmt: skip
    with torch.no_grad():
        judged = classifier(samples, torch.zeros(20, dtype=torch.long)).argmax(-1)
    assert result["agreement"] == pytest.approx(float((judged == want).float().mean()))
    assert result["protocol"]["classifier_scale"] == 3.0 and result["protocol"]["judge"].endswith("at t = 0")


@pytest.mark.parametrize(
    "extra,match",
    [
        ([], "needs a judge"),
        (["guided.judge=svc_digits"], "needs samples drawn for labels"),
        (["guided.judge=svc_digits", "guided.guidance=1"], "class-conditional checkpoint"),
    ],
)
def test_bad_guided_configs_are_config_errors(tiny_ckpt, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(tiny_ckpt, tmp_path, *GUIDED, *extra), tmp_path)


def test_guided_cli(guided_runs, tmp_path):
    cond, _ = guided_runs
    out = tmp_path / "out"
    r = run_cli("evaluate.py", f"ckpt_path={cond}", *GUIDED, "guided.judge=svc_digits", "guided.guidance=1",
                f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "agreement = " in r.stdout
    saved = json.loads((out / "metrics.json").read_text())["guided"]
    assert 0 <= saved["agreement"] <= 1 and saved["protocol"]["num_samples"] == 20
