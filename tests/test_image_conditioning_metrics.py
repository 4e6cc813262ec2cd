"""evaluate.py on image-conditioned models: metrics=[sr] (super-resolution beside bicubic upsampling, pixel and
latent) and metrics=[inpaint] on a trained inpainting model beside RePaint, checked against direct computations."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY, TINY_CLASSIFIER, compose_cfg, run_cli
from ddpmlab import evaluation
from ddpmlab.api import load
from ddpmlab.cli.evaluate import evaluate
from ddpmlab.conditioning import Cond
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.image_metrics import inpainting_metrics, sr_metrics, ssim_window
from ddpmlab.samplers import Sampler, generate
from ddpmlab.samplers.masks import make_mask

SR = ["metrics=[sr]", "sr.num_images=12", "sr.num_samples=3", "sr.sampler.algorithm=ddim", "sr.sampler.num_steps=4"]


def eval_cfg(ckpt, out, *extra):
    return compose_cfg("evaluate", [f"ckpt_path={ckpt}", "batch_size=16", *extra], out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny checkpoints (digits, T = 50, 6 steps): x2 super-resolution and trained inpainting."""
    from ddpmlab.training import train

    root = tmp_path_factory.mktemp("image_cond")
    for name in ("sr_digits", "inpaint_digits"):
        train(compose_cfg("train", [f"experiment={name}", *TINY], root / name))
    return {name: root / name / "checkpoints" / "last.ckpt" for name in ("sr_digits", "inpaint_digits")}


def held_out_digits(cfg, n):
    from ddpmlab.api import rebuild

    dm = rebuild(cfg.data, "data")
    dm.setup("fit")
    items = [dm.val_set[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def unit(x):
    return ((x + 1) / 2).clamp(0, 1)


def psnr_direct(a, b):  # a, b on [0, 1], per image, then the mean
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


# ------------------------------------------------------------------------------------------------ sr_metrics itself
def test_sr_metrics_of_an_oracle_and_of_bicubic_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    lowres = F.avg_pool2d(x, 2)

    def degrade(v):
        return F.avg_pool2d(v, 2)

    oracle = sr_metrics(x[:, None].repeat(1, 3, 1, 1, 1), x, lowres, degrade, window=ssim_window((8, 8)))
    assert oracle["psnr"] == math.inf and oracle["consistency"] == math.inf
    assert oracle["ssim"] == pytest.approx(1.0, abs=1e-5) and oracle["spread"] == 0
    # bicubic: its consistency is the PSNR of avg_pool(bicubic(lowres)) against lowres, computed here by hand
    up = F.interpolate(lowres, size=(8, 8), mode="bicubic", align_corners=False).clamp(-1, 1)
    bicubic = sr_metrics(up[:, None], x, lowres, degrade)
    assert bicubic["consistency"] == pytest.approx(psnr_direct(unit(F.avg_pool2d(up, 2)), unit(lowres)), rel=1e-5)
    assert bicubic["psnr"] == pytest.approx(psnr_direct(unit(up), unit(x)), rel=1e-5)
    assert 0 < bicubic["psnr"] < 60 and 0 < bicubic["consistency"] < 60 and bicubic["spread"] == 0
    flat = torch.full((2, 1, 8, 8), 0.5)  # bicubic reproduces a constant image: exact, both ways
    assert sr_metrics(flat[:, None], flat, F.avg_pool2d(flat, 2), degrade)["consistency"] == math.inf
    # spread: two samples of an input, all black and all white: per-pixel std 0.5 on [0, 1]
    two = torch.stack([-torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8)], dim=1)  # [1,2,1,8,8]
    assert sr_metrics(two, x[:1], lowres[:1], degrade)["spread"] == pytest.approx(0.5)
    # accuracy: a judge's predictions of every output against its input's label
    labels = torch.tensor([0, 1, 2, 3, 4])
    odd = sr_metrics(x[:, None].repeat(1, 2, 1, 1, 1), x, lowres, degrade, lambda im: np.arange(len(im)) % 2, labels)
    assert odd["accuracy"] == pytest.approx(np.mean(np.arange(10) % 2 == labels.repeat_interleave(2).numpy()))


def test_the_ssim_window_fits_the_image_size():
    assert ssim_window((8, 8)) == (7, 1.0) and ssim_window((32, 32)) == (11, 1.5)


# ------------------------------------------------------------------------------------------------ metrics=[sr]
def test_sr_matches_a_direct_computation(runs, tmp_path):
    ckpt = runs["sr_digits"]
    result = evaluate(eval_cfg(ckpt, tmp_path, *SR), tmp_path)["sr"]
    assert json.loads((tmp_path / "metrics.json").read_text())["sr"] == json.loads(json.dumps(result))
    assert set(result["model"]) == set(result["bicubic"]) == {"psnr", "ssim", "consistency", "spread"}  # no judge
    denoiser, cfg = load(ckpt)
    x0, _ = held_out_digits(cfg, 12)
    lowres = F.avg_pool2d(x0, 2)  # task=sr, factor 2: 4x4 inputs
    sampler = Sampler.from_config(OmegaConf.to_container(cfg.sampler), {"algorithm": "ddim", "num_steps": 4})
    samples = generate(denoiser, sampler, 36, seed=0, batch_size=16, cond=Cond(image=lowres).repeat_interleave(3))
    originals = x0.repeat_interleave(3, dim=0)
    model = result["model"]
    assert model["psnr"] == pytest.approx(psnr_direct(unit(samples), unit(originals)), rel=1e-5)
    low = lowres.repeat_interleave(3, dim=0)
    assert model["consistency"] == pytest.approx(psnr_direct(unit(F.avg_pool2d(samples.clamp(-1, 1), 2)), unit(low)))
    spread = unit(samples).unflatten(0, (12, 3)).std(1, correction=0).mean()
    assert model["spread"] == pytest.approx(float(spread), rel=1e-5) and model["spread"] > 0
    up = F.interpolate(lowres, size=(8, 8), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert result["bicubic"]["psnr"] == pytest.approx(psnr_direct(unit(up), unit(x0)), rel=1e-5)
    protocol = result["protocol"]
    assert protocol["sizes"] == "4x4 -> 8x8" and protocol["num_samples"] == 3 and protocol["network_evaluations"] == 4
    assert protocol["ssim_window"].startswith("gaussian sigma 1.0, 7 taps") and protocol["judge"] is None


def test_an_oracle_model_scores_like_the_originals(runs, tmp_path, monkeypatch):
    """A "model" that returns each input's original: infinite PSNR, SSIM 1, the judge's accuracy on the originals,
    and the conditions it was handed are the low-resolution originals, each num_samples times."""
    denoiser, cfg = load(runs["sr_digits"])
    x0, labels = held_out_digits(cfg, 12)
    seen = {}

    def oracle(denoiser, sampler, n, *, cond, **kwargs):
        seen["cond"] = cond
        return x0.repeat_interleave(n // len(x0), dim=0)

    monkeypatch.setattr(evaluation, "generate", oracle)
    result = evaluate(eval_cfg(runs["sr_digits"], tmp_path, *SR, "sr.judge=svc_digits"), tmp_path)["sr"]
    torch.testing.assert_close(seen["cond"].image, F.avg_pool2d(x0, 2).repeat_interleave(3, dim=0))
    model, bicubic = result["model"], result["bicubic"]
    assert model["psnr"] == math.inf and model["consistency"] == math.inf and model["spread"] == 0
    assert model["ssim"] == pytest.approx(1.0, abs=1e-5) and bicubic["ssim"] < 0.99
    assert model["accuracy"] == result["originals_accuracy"] >= 0.9  # the SVC reads real digits
    from sklearn.svm import SVC

    from ddpmlab.api import rebuild

    dm = rebuild(cfg.data, "data")
    dm.setup("fit")
    train = [dm.train_set[i] for i in range(len(dm.train_set))]

    def pixels(t):
        return (((t.clamp(-1, 1) + 1) * 127.5).round() / 255).flatten(1).double().numpy()

    svm = SVC(kernel="rbf", C=10.0, gamma="scale").fit(
        pixels(torch.stack([x for x, _ in train])), np.array([int(y) for _, y in train])
    )
    assert model["accuracy"] == pytest.approx(float((svm.predict(pixels(x0)) == labels.numpy()).mean()), abs=1e-9)
    assert bicubic["accuracy"] == pytest.approx(float((svm.predict(pixels(bicubic_of(x0))) == labels.numpy()).mean()))


def bicubic_of(x0):
    return F.interpolate(F.avg_pool2d(x0, 2), size=(8, 8), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_guidance_and_the_seed_change_the_samples_not_bicubic(runs, tmp_path):
    a = evaluate(eval_cfg(runs["sr_digits"], tmp_path / "a", *SR), tmp_path / "a")["sr"]
    b = evaluate(eval_cfg(runs["sr_digits"], tmp_path / "b", *SR, "sr.guidance=2"), tmp_path / "b")["sr"]
    c = evaluate(eval_cfg(runs["sr_digits"], tmp_path / "c", *SR, "seed=1"), tmp_path / "c")["sr"]
    assert a["model"]["psnr"] != b["model"]["psnr"] and a["model"]["psnr"] != c["model"]["psnr"]
    assert a["bicubic"] == b["bicubic"] == c["bicubic"] and b["protocol"]["guidance"] == 2.0


@pytest.mark.parametrize(
    "which,extra,match",
    [
        ("tiny", [], "super-resolution model"),
        ("sr_digits", ["sr.num_samples=0"], "num_samples"),
        ("sr_digits", ["sr.num_images=500"], "validation split has 180"),
        ("sr_digits", ["metrics=[inpaint]"], "use metrics=\\[sr\\]"),
    ],
)
def test_bad_sr_configs_are_config_errors(runs, tiny_ckpt, tmp_path, which, extra, match):
    ckpt = tiny_ckpt if which == "tiny" else runs[which]
    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(ckpt, tmp_path, *SR, *extra), tmp_path)


def test_sr_cli_prints_the_table(runs, tmp_path):
    out = tmp_path / "out"
    r = run_cli("evaluate.py", f"ckpt_path={runs['sr_digits']}", *SR, "sr.judge=svc_digits", f"hydra.run.dir={out}",
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x2 super-resolution of 12 validation images (3 samples each)" in r.stdout
    header = next(line for line in r.stdout.splitlines() if "consistency" in line)
    assert header.split() == ["psnr", "ssim", "consistency", "accuracy", "spread"]
    assert any(line.startswith("model ") for line in r.stdout.splitlines())
    assert any(line.startswith("bicubic ") for line in r.stdout.splitlines())
    saved = json.loads((out / "metrics.json").read_text())["sr"]
    assert 0 <= saved["model"]["accuracy"] <= 1 and saved["bicubic"]["spread"] == 0


def test_latent_sr_conditions_on_pixels_and_scores_decoded_samples(tmp_path_factory, tmp_path):
    """experiment=ldm_sr_mnist made tiny on the digits: the low-resolution image comes from the pixels, the samples
    are decoded to pixels; bicubic's row is the pixel model's (same images, same factor)."""
    from ddpmlab.training import train
    from test_latent import AE, ldm_overrides

    root = tmp_path_factory.mktemp("ldm_sr")
    train(compose_cfg("train", [*AE, "trainer.max_steps=10", "trainer.val_check_interval=10"], root / "ae"))
    ae = root / "ae" / "checkpoints" / "last.ckpt"
    overrides = [o for o in ldm_overrides(ae) if o != "experiment=ldm_mnist"]
    train(compose_cfg("train", ["experiment=ldm_sr_mnist", *overrides, "task.factor=2"], root / "ldm"))
    ckpt = root / "ldm" / "checkpoints" / "last.ckpt"
    latent = evaluate(eval_cfg(ckpt, tmp_path / "l", *SR), tmp_path / "l")["sr"]
    denoiser, cfg = load(ckpt)
    assert cfg.stage == "latent_diffusion" and tuple(denoiser.sample_shape) == (2, 4, 4)
    assert latent["protocol"]["sizes"] == "4x4 -> 8x8"
    assert all(np.isfinite(v) for v in latent["model"].values()) and latent["model"]["spread"] > 0
    x0, _ = held_out_digits(cfg, 12)
    sampler = Sampler.from_config(OmegaConf.to_container(cfg.sampler), {"algorithm": "ddim", "num_steps": 4})
    samples = generate(denoiser, sampler, 36, seed=0, batch_size=16,
                       cond=Cond(image=F.avg_pool2d(x0, 2)).repeat_interleave(3))  # fmt: skip
    assert samples.shape == (36, 1, 8, 8)
    assert latent["model"]["psnr"] == pytest.approx(psnr_direct(unit(samples), unit(x0.repeat_interleave(3, 0))))
    assert latent["bicubic"]["psnr"] == pytest.approx(psnr_direct(unit(bicubic_of(x0)), unit(x0)), rel=1e-5)


# ------------------------------------------------------------------------------------------------ metrics=[inpaint]
INPAINT = ["metrics=[inpaint]", "inpaint.num_images=10", "inpaint.jump_length=2", "inpaint.jump_n_sample=2",
           "inpaint.sampler.algorithm=ddim", "inpaint.sampler.num_steps=10"]  # fmt: skip


@pytest.mark.parametrize("S,j,r", [(10, 2, 2), (25, 10, 10), (7, 1, 1), (26, 2, 2), (100, 10, 10), (13, 5, 3)])
def test_repaint_steps_for_counts_as_the_sampler_does(S, j, r):
    from ddpmlab.diffusion import GaussianDiffusion, linear_betas

    diffusion = GaussianDiffusion(linear_betas(200))
    nfe = Sampler("repaint", S, "leading", jump_length=j, jump_n_sample=r).num_evaluations(diffusion)
    assert evaluation.repaint_steps_for(nfe, 200, j, r) == S  # the most steps within that budget: S itself
    more = Sampler("repaint", S + 1, "leading", jump_length=j, jump_n_sample=r).num_evaluations(diffusion)
    assert more > nfe


def test_trained_inpainting_beside_repaint_on_the_same_masks(runs, tiny_ckpt, tmp_path, monkeypatch):
    calls = []

    def spy(denoiser, sampler, n, **kwargs):
        out = generate(denoiser, sampler, n, **kwargs)
        calls.append((sampler, kwargs, out))
        return out

    monkeypatch.setattr(evaluation, "generate", spy)
    result = evaluate(eval_cfg(runs["inpaint_digits"], tmp_path, *INPAINT, f"inpaint.repaint_ckpt={tiny_ckpt}",
                               "inpaint.masks=[centre_square,random_strokes]"), tmp_path)["inpaint"]  # fmt: skip
    assert list(result["masks"]) == ["centre_square", "random_strokes"] and len(calls) == 4
    denoiser, cfg = load(runs["inpaint_digits"])
    x0, _ = held_out_digits(cfg, 10)
    for i, mask in enumerate(["centre_square", "random_strokes"]):
        (trained_sampler, trained, out), (repaint_sampler, repaint, completions) = calls[2 * i : 2 * i + 2]
        keep = repaint["keep"]
        torch.testing.assert_close(keep, make_mask(mask, (8, 8), torch.Generator().manual_seed(0)))
        image = trained["cond"].image  # [x0 * keep, keep]: the same mask as RePaint's, the same images
        assert torch.equal(image[:, 1], keep.expand(10, 8, 8)) and torch.equal(image[:, :1], x0 * keep)
        torch.testing.assert_close(repaint["x0"], x0)
        row = result["masks"][mask]
        assert set(row) == {"hole_fraction", "trained", "repaint"}
        assert row["trained"] == pytest.approx(inpainting_metrics(torch.where(keep.bool(), x0, out), x0, keep))
        assert row["repaint"] == pytest.approx(inpainting_metrics(completions, x0, keep))
        assert trained_sampler.algorithm == "ddim" and repaint_sampler.algorithm == "repaint"
    protocol = result["protocol"]
    # 10 DDIM steps; RePaint with j = 2, r = 2 on S steps: S + 2 * len(range(0, S - 2, 2)) = 10 at S = 6
    assert protocol["network_evaluations"] == {"trained": 10, "repaint": 10} and protocol["nfe_matched"]
    assert protocol["samplers"]["repaint"]["num_steps"] == 6


def test_trained_inpainting_alone_and_with_nfe_unmatched(runs, tiny_ckpt, tmp_path):
    alone = evaluate(eval_cfg(runs["inpaint_digits"], tmp_path / "a", *INPAINT), tmp_path / "a")["inpaint"]
    assert list(alone["masks"]) == ["left_half"] and set(alone["masks"]["left_half"]) == {"hole_fraction", "trained"}
    both = evaluate(eval_cfg(runs["inpaint_digits"], tmp_path / "b", *INPAINT, f"inpaint.repaint_ckpt={tiny_ckpt}",
                             "inpaint.match_nfe=false", "inpaint.num_steps=8"), tmp_path / "b")["inpaint"]  # fmt: skip
    assert both["masks"]["left_half"]["trained"] == alone["masks"]["left_half"]["trained"]  # same seed, same draws
    assert both["protocol"]["network_evaluations"] == {"trained": 10, "repaint": 8 + 2 * 3}
    assert not both["protocol"]["nfe_matched"]


def test_several_masks_on_an_unconditional_model_give_repaints_own_numbers(tiny_ckpt, tmp_path):
    old = ["metrics=[inpaint]", "inpaint.num_images=6", "inpaint.num_steps=10", "inpaint.jump_length=2",
           "inpaint.jump_n_sample=2"]  # fmt: skip
    table = evaluate(eval_cfg(tiny_ckpt, tmp_path / "t", *old, "inpaint.masks=[left_half,centre_square]"),
                     tmp_path / "t")["inpaint"]  # fmt: skip
    one = evaluate(eval_cfg(tiny_ckpt, tmp_path / "o", *old, "inpaint.mask=centre_square"), tmp_path / "o")["inpaint"]
    assert table["masks"]["centre_square"]["repaint"] == pytest.approx(
        {k: one[k] for k in ("mse_hole", "psnr", "ssim")}
    )
    assert table["protocol"]["network_evaluations"] == {"repaint": one["protocol"]["network_evaluations"]}


@pytest.mark.parametrize(
    "ckpt_of,extra,match",
    [
        ("tiny", ["inpaint.repaint_ckpt=REPAINT"], "is unconditional: drop inpaint.repaint_ckpt"),
        ("inpaint", ["inpaint.repaint_ckpt=SR"], "must be an unconditional pixel-space model"),
        ("inpaint", ["inpaint.repaint_ckpt=REPAINT", "inpaint.jump_length=10", "inpaint.jump_n_sample=10"],
         "needs at least 101 network evaluations"),
    ],
)  # fmt: skip
def test_bad_trained_inpainting_configs_are_config_errors(runs, tiny_ckpt, tmp_path, ckpt_of, extra, match):
    paths = {"REPAINT": str(tiny_ckpt), "SR": str(runs["sr_digits"])}
    extra = [e.split("=")[0] + "=" + paths.get(e.split("=")[1], e.split("=")[1]) for e in extra]
    ckpt = tiny_ckpt if ckpt_of == "tiny" else runs["inpaint_digits"]
    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(ckpt, tmp_path, *INPAINT, *extra), tmp_path)


def test_a_classifier_judge_of_another_image_size_reads_resized_outputs(runs, tmp_path_factory, tmp_path, monkeypatch):
    """A noisy classifier trained on 16x16 digits judges the 8x8 outputs resized to 16x16 (as a 28x28 MNIST
    classifier judges 32x32 latent-diffusion samples), at t = 0."""
    from ddpmlab.api import classifier_from_checkpoint, load_checkpoint
    from ddpmlab.training import train

    run = tmp_path_factory.mktemp("clf16")
    train(compose_cfg("train", [*TINY_CLASSIFIER, "data.image_size=16"], run))
    judge = run / "checkpoints" / "last.ckpt"
    denoiser, cfg = load(runs["sr_digits"])
    x0, labels = held_out_digits(cfg, 12)
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: x0.flip(0).repeat_interleave(3, dim=0))
    result = evaluate(eval_cfg(runs["sr_digits"], tmp_path, *SR, f"sr.judge={judge}"), tmp_path)["sr"]
    classifier = classifier_from_checkpoint(load_checkpoint(judge))[0]
    with torch.no_grad():
        seen = F.interpolate(x0.flip(0), size=(16, 16), mode="bilinear", antialias=True)
        predicted = classifier(seen, torch.zeros(12, dtype=torch.long)).argmax(-1)
    assert result["model"]["accuracy"] == pytest.approx(float((predicted == labels).float().mean()))
    assert result["protocol"]["judge_image_size"] == 16 and result["protocol"]["judge"].endswith("at t = 0")
