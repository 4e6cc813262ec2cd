"""The sampler atlas (evaluate.py metrics=[atlas]) and the Frechet distances it reports without Inception."""

import csv
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from conftest import TINY_CLASSIFIER, compose_cfg
from ddpmlab.atlas import atlas_samplers, label_of, steps_for
from ddpmlab.cli.evaluate import evaluate
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.frechet import FeatureSpace, feature_space, frechet_distance, gaussian_stats, real_stats
from sampler_helpers import linear


# ------------------------------------------------------------------------------------------------ the distance
def test_frechet_distance_agrees_with_closed_forms_and_with_a_general_matrix_square_root():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.1, 2, size=6), rng.uniform(0.1, 2, size=6)
    # diagonal covariances: ||mu_a - mu_b||^2 + sum (sqrt(var_a) - sqrt(var_b))^2
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(closed, rel=1e-10)
    assert frechet_distance(mu_a, np.diag(var_a), mu_a, np.diag(var_a)) == pytest.approx(0, abs=1e-10)
    # full covariances: FID's reference formula with scipy's sqrtm
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    (ma, ca), (mb, cb) = gaussian_stats(a), gaussian_stats(b)
    reference = ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(ma, ca, mb, cb) == pytest.approx(reference, rel=1e-8)
    # singular covariances (a pixel that never changes) are fine and symmetric
    a[:, 0] = b[:, 0] = 0
    (ma, ca), (mb, cb) = gaussian_stats(a), gaussian_stats(b)
    assert frechet_distance(ma, ca, mb, cb) == pytest.approx(frechet_distance(mb, cb, ma, ca), rel=1e-8)


def test_pixel_space_needs_the_shape_and_more_real_images_than_dimensions(tmp_path):
    space = FeatureSpace((1, 8, 8))
    assert space.label == "FD (pixels, 64-d)"
    with pytest.raises(ConfigError, match=r"more real images than its 64 dimensions"):
        real_stats(space, torch.zeros(50, 1, 8, 8, dtype=torch.uint8), "ref", None)
    with pytest.raises(ConfigError, match=r"takes images of 1x8x8 but the model's samples are 1x28x28"):
        feature_space("pixels", (1, 28, 28), "atlas.features").check_images((1, 28, 28), "x")  # built for 28x28: fine
        space.check_images((1, 28, 28), "the model's samples")
    images = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
    mu, cov = real_stats(space, images, "ref", tmp_path)
    cached = list(tmp_path.glob("ref-pixels64.npz"))
    assert len(cached) == 1
    mu2, cov2 = real_stats(space, torch.zeros_like(images), "ref", tmp_path)  # read back, not recomputed
    assert np.array_equal(mu, mu2) and np.array_equal(cov, cov2)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from ddpmlab.training import train

    run = tmp_path_factory.mktemp("clf")
    train(compose_cfg("train", TINY_CLASSIFIER, run))
    return run / "checkpoints" / "last.ckpt"


def test_classifier_features_judge_real_digits_closer_than_noise_and_refuse_another_size(tiny_classifier):
    from ddpmlab.data.datasets import load_digits

    space = feature_space(str(tiny_classifier), (1, 8, 8), "atlas.features")
    assert space.label == f"FD (features of {tiny_classifier})" and space.dim == 32
    images = load_digits()[0].reshape(-1, 1, 8, 8)
    first, second = images[::2], images[1::2]
    mu, cov = gaussian_stats(space(first))
    noise = torch.randint(0, 256, second.shape, dtype=torch.uint8)
    same = frechet_distance(*gaussian_stats(space(second)), mu, cov)
    other = frechet_distance(*gaussian_stats(space(noise)), mu, cov)
    assert 0 <= same < other / 10
    with pytest.raises(ConfigError, match=r"takes images of 1x8x8 but the model's samples are 1x8x16"):
        feature_space(str(tiny_classifier), (1, 8, 16), "atlas.features")


# ------------------------------------------------------------------------------------------------ samplers, NFE
def test_atlas_samplers_start_from_the_shipped_configs_and_name_themselves():
    ddpm, large, ddim = atlas_samplers(["ddpm", {"algorithm": "ddpm", "variance": "large"}, "ddim"])
    assert ddpm.options["variance"] == "auto" and large.options["variance"] == "large"
    assert large.spacing == ddpm.spacing and large.options["clip_x0"] is True  # the shipped config's other keys
    assert label_of(ddim) == "ddim[leading, eta=0.0]" and label_of(large) == "ddpm[leading, variance=large]"
    with pytest.raises(ConfigError, match=r"'nope', which is not a shipped sampler; choose from \[.*'ddim'"):
        atlas_samplers(["nope"])
    with pytest.raises(ConfigError, match=r"must be a shipped sampler's name"):
        atlas_samplers([{"eta": 1.0}])


def test_steps_for_an_nfe_is_exact_where_it_can_be_and_the_most_below_it_otherwise():
    d = linear(1000)
    ddim = atlas_samplers(["ddim"])[0]
    assert steps_for(ddim, d, 7) == (7, 7) and steps_for(ddim, d, 1000) == (1000, 1000)
    heun = atlas_samplers(["heun"])[0]  # 2S - 1 evaluations
    assert steps_for(heun, d, 9) == (5, 9) and steps_for(heun, d, 10) == (5, 9) and steps_for(heun, d, 1) == (1, 1)
    assert heun.with_steps(5).num_evaluations(d) == 9
    with pytest.raises(ConfigError, match=r"repaint completes images .* metrics=\[inpaint\]"):
        atlas_samplers([{"algorithm": "repaint"}])


# ------------------------------------------------------------------------------------------------ end to end
def atlas_cfg(ckpt, out, *extra):
    return compose_cfg(
        "evaluate",
        [f"ckpt_path={ckpt}", "metrics=[atlas]", "batch_size=16", "atlas.num_samples=24", "atlas.features=pixels",
         f"atlas.cache_dir={out.parent / 'cells'}", f"fid.cache_dir={out.parent / 'stats'}", *extra],
        out,
    )  # fmt: skip


def test_atlas_writes_every_cell_from_the_same_noise_and_continues_where_it_stopped(tiny_ckpt, tmp_path, capsys):
    # DDIM with eta = 1 is ancestral sampling with beta_tilde on any grid: drawn from the same x_T and noise, the two
    # curves must coincide, which they do only if every cell starts from the same seeds.
    samplers = "atlas.samplers=[{algorithm:ddim,eta:1.0},{algorithm:ddpm,variance:small},ddim]"
    out = tmp_path / "first"
    result = evaluate(atlas_cfg(tiny_ckpt, out, samplers, "atlas.nfe=[3,50]"), out)["atlas"]
    cells = result["cells"]
    assert [(c["sampler"], c["nfe"]) for c in cells] == [
        ("ddim[leading, eta=1.0]", 3), ("ddim[leading, eta=1.0]", 50), ("ddpm[leading, variance=small]", 3),
        ("ddpm[leading, variance=small]", 50), ("ddim[leading, eta=0.0]", 3), ("ddim[leading, eta=0.0]", 50),
    ]  # fmt: skip
    assert result["quality"] == "FD (pixels, 64-d)"
    for eta1, small in zip(cells[:2], cells[2:4], strict=True):
        assert eta1["fd"] == pytest.approx(small["fd"], rel=1e-3)
    assert cells[4]["fd"] != pytest.approx(cells[0]["fd"], rel=1e-3)  # eta = 0 is another sampler
    assert all(c["fd"] > 0 and c["seconds_per_image"] > 0 for c in cells)
    saved = json.loads((out / "atlas.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(cells)) and saved["protocol"]["num_samples"] == 24
    rows = list(csv.DictReader((out / "atlas.csv").open()))
    assert len(rows) == 6 and float(rows[1]["FD (pixels, 64-d)"]) == pytest.approx(cells[1]["fd"], rel=1e-5)
    assert (out / "atlas.png").stat().st_size > 10_000
    first_lines = capsys.readouterr().out

    # Run again with one more NFE: the six cells are read back, only the two new ones are drawn.
    out2 = tmp_path / "again"
    again = evaluate(atlas_cfg(tiny_ckpt, out2, samplers, "atlas.nfe=[3,10,50]"), out2)["atlas"]["cells"]
    lines = capsys.readouterr().out
    assert "(saved earlier)" not in first_lines and lines.count("(saved earlier)") == 6
    assert len(again) == 9 and [c["fd"] for c in again if c["nfe"] != 10] == [c["fd"] for c in cells]
    # Another seed is another set of samples: nothing is read back.
    out3 = tmp_path / "seed1"
    evaluate(atlas_cfg(tiny_ckpt, out3, "atlas.samplers=[ddim]", "atlas.nfe=[3]", "seed=1"), out3)
    assert "(saved earlier)" not in capsys.readouterr().out


def test_fid_with_features_reports_a_named_frechet_distance_not_fid(tiny_ckpt, tmp_path):
    over = [f"ckpt_path={tiny_ckpt}", "metrics=[fid]", "batch_size=16", "fid.num_samples=80", "fid.num_steps=3",
            "fid.features=pixels", f"fid.cache_dir={tmp_path / 'stats'}"]  # fmt: skip
    fid = evaluate(compose_cfg("evaluate", over, tmp_path / "e"), tmp_path / "e")["fid"]
    assert "fid" not in fid and fid["fd"] > 0 and fid["protocol"]["quality"] == "FD (pixels, 64-d)"


@pytest.mark.parametrize(
    "override,message",
    [
        ("atlas.nfe=[0,10]", r"atlas.nfe=\[0, 10\] must be a non-empty list of integers >= 1"),
        ("atlas.num_samples=1", r"atlas.num_samples=1 must be an integer >= 2"),
        ("atlas.samplers=[ddim,nope]", r"'nope', which is not a shipped sampler"),
        ("atlas.features=/no/such.ckpt", r"no checkpoint at /no/such.ckpt"),
    ],
)
def test_bad_atlas_options_are_one_line_each(tiny_ckpt, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(atlas_cfg(tiny_ckpt, tmp_path / "e", "atlas.samplers=[ddim]", override), tmp_path / "e")


def test_with_logger_wandb_the_atlas_table_and_plot_go_to_an_offline_run(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    out = tmp_path / "e"
    evaluate(atlas_cfg(tiny_ckpt, out, "atlas.samplers=[ddim]", "atlas.nfe=[3]", "logger=wandb"), out)
    import wandb

    wandb.teardown()
    [run_dir] = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("files/media/images/atlas/plot*.png"))
    assert list(run_dir.glob("files/media/table/atlas/table*.table.json"))
    log = next(run_dir.glob("*.wandb")).read_bytes()
    assert b"atlas/table" in log and b"atlas/fd" not in log  # the table, and the cells only inside it
