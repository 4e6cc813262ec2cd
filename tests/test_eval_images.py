"""evaluate.py metrics=[inpaint] (hole MSE, PSNR, SSIM against the originals) and metrics=[guided] (agreement of a
judge with the requested labels), checked against direct computations."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, compose_cfg, run_cli
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
    conv = lambda x: torch.nn.functional.conv2d(x, w[None, None])  # noqa: E731
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
    r = run_cli("evaluate.py", f"ckpt_path={tiny_ckpt}", *INPAINT, "inpaint.num_images=2", "inpaint.lpips=true",
                f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 2 and "ddpmlab: error: LPIPS needs the VGG16 ImageNet weights" in r.stderr
    assert "Traceback" not in r.stderr
