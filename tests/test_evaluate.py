"""evaluate.py (bits/dim of a checkpoint on held-out images, metrics.json) and sample.py's denoising chain."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_cfg, run_cli
from ddpmlab.cli.evaluate import METRICS, evaluate
from ddpmlab.cli.sample import chosen_sampler, sample
from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.images import image_grid
from ddpmlab.samplers import Sampler


def eval_cfg(ckpt, out, *extra):
    return compose_cfg(
        "evaluate", [f"ckpt_path={ckpt}", "batch_size=16", "bpd.num_images=20", "bpd.stride=10", *extra], out
    )


def test_evaluate_writes_bpd_with_its_standard_error(tiny_ckpt, tmp_path):
    results = evaluate(eval_cfg(tiny_ckpt, tmp_path), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    bpd = saved["bpd"]
    assert bpd["n"] == 20 and bpd["seconds"] > 0
    assert 0 < bpd["value"] < 100 and 0 < bpd["stderr"] < bpd["value"]
    assert bpd["value"] == pytest.approx(sum(bpd["terms"].values()), rel=1e-5)
    protocol = bpd["protocol"]
    assert protocol["T"] == 50 and protocol["stride"] == 10 and protocol["timesteps_per_image"] == 1 + 5
    assert (
        protocol["dataset"] == "digits"
        and protocol["split"] == "validation"
        and protocol["variance"] == "sigma_t^2 = beta_t"
    )
    assert saved["checkpoint"]["path"] == str(tiny_ckpt) and saved["checkpoint"]["ema"] is True


def test_the_seed_fixes_the_estimate(tiny_ckpt, tmp_path):
    a = evaluate(eval_cfg(tiny_ckpt, tmp_path / "a"), tmp_path / "a")["bpd"]["value"]
    b = evaluate(eval_cfg(tiny_ckpt, tmp_path / "b"), tmp_path / "b")["bpd"]["value"]
    c = evaluate(eval_cfg(tiny_ckpt, tmp_path / "c", "seed=1"), tmp_path / "c")["bpd"]["value"]
    assert a == b and a != c


def test_the_whole_validation_split_by_default(tiny_ckpt, tmp_path):
    bpd = evaluate(eval_cfg(tiny_ckpt, tmp_path, "bpd.num_images=null", "bpd.stride=49", "batch_size=64"), tmp_path)[
        "bpd"
    ]
    assert bpd["n"] == 180  # digits: 10% of 1,797 held out


@pytest.mark.parametrize(
    "extra,match",
    [
        (["bpd.num_images=500"], "only 180"),
        (["metrics=[bpd,fid_typo]"], "unknown metric"),
        (["bpd.stride=0"], "stride"),
        (["bpd.variance=learned"], "variance"),
    ],
)
def test_bad_evaluation_configs_are_config_errors(tiny_ckpt, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        evaluate(eval_cfg(tiny_ckpt, tmp_path, *extra), tmp_path)


def test_metrics_are_a_registry_others_can_extend():
    assert "bpd" in METRICS and callable(METRICS["bpd"])


def test_evaluate_cli(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        "evaluate.py",
        f"ckpt_path={tiny_ckpt}",
        "bpd.num_images=8",
        "bpd.stride=25",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bits/dim on 8 validation images" in r.stdout
    assert json.loads((out / "metrics.json").read_text())["bpd"]["n"] == 8


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):  # friendly_errors makes it one line and exit 2
        evaluate(eval_cfg(tmp_path / "missing.ckpt", tmp_path), tmp_path)


@pytest.mark.parametrize(
    "name,overrides,expected",
    [
        ("ddpm", [], ("ddpm", None, "leading", {"variance": "auto", "clip_x0": True})),
        ("ddim", ["sampler.num_steps=20", "sampler.eta=0.5"], ("ddim", 20, "leading", {"eta": 0.5, "clip_x0": True})),
        ("dpm_solver", [], ("dpm_solver", 20, "logsnr", {"order": 2, "clip_x0": True})),
    ],
)
def test_every_sampler_config_composes_into_a_sampler(tmp_path, name, overrides, expected):
    from hydra.utils import instantiate

    cfg = compose_cfg("sample", ["ckpt_path=x", f"sampler={name}", *overrides], tmp_path)
    checkpoints_own = {"algorithm": "ddpm", "num_steps": 7, "spacing": "trailing", "variance": "large"}
    sampler = chosen_sampler(cfg, OmegaConf.create({"sampler": checkpoints_own}))  # a named algorithm replaces it
    assert isinstance(sampler, Sampler)
    assert (sampler.algorithm, sampler.num_steps, sampler.spacing, sampler.options) == expected
    train_cfg = compose_cfg("train", [f"sampler={name}", *overrides], tmp_path)
    assert repr(instantiate(train_cfg.sampler)) == repr(sampler)  # the training config builds the same one


def test_sample_defaults_to_the_checkpoints_sampler_and_the_command_line_wins(tmp_path):
    own = OmegaConf.create(
        {
            "sampler": {
                "_target_": "ddpmlab.samplers.Sampler",
                "algorithm": "ddpm",
                "num_steps": None,
                "spacing": "leading",
                "variance": "large",
                "clip_x0": True,
            }
        }
    )
    plain = chosen_sampler(compose_cfg("sample", ["ckpt_path=x"], tmp_path), own)
    assert (plain.algorithm, plain.num_steps, plain.options) == ("ddpm", None, {"variance": "large", "clip_x0": True})
    fewer = chosen_sampler(
        compose_cfg("sample", ["ckpt_path=x", "sampler.num_steps=10", "sampler.spacing=trailing"], tmp_path), own
    )
    assert (fewer.num_steps, fewer.spacing, fewer.options["variance"]) == (10, "trailing", "large")
    with pytest.raises(ConfigError, match="has no option"):  # an option of another algorithm is refused
        chosen_sampler(compose_cfg("sample", ["ckpt_path=x", "sampler.eta=0.5"], tmp_path), own)
    foreign = OmegaConf.create({"sampler": {"_target_": "os.system", "algorithm": "ddpm"}})
    with pytest.raises(ConfigError, match="builds only"):
        chosen_sampler(compose_cfg("sample", ["ckpt_path=x"], tmp_path), foreign)


# ------------------------------------------------------------------------------------------------ denoising chains
@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 5), ("dpm_solver", 6)])
def test_save_chain_writes_a_strip_rows_samples_columns_steps(tiny_ckpt, tmp_path, sampler, steps):
    cfg = compose_cfg(
        "sample",
        [
            f"ckpt_path={tiny_ckpt}",
            "num_samples=2",
            f"sampler={sampler}",
            f"sampler.num_steps={steps}",
            "save_chain=true",
            "chain_samples=3",
            "chain_frames=4",
        ],
        tmp_path,
    )
    sample(cfg, tmp_path)
    strip = Image.open(tmp_path / "chain.png")
    _, height, width = image_grid(torch.zeros(3 * 4, 1, 8, 8), nrow=4).shape  # 3 rows x 4 columns of 8x8 images
    assert strip.size == (width, height) and width > height
    assert not (tmp_path.parent / "chain.png").exists()


def test_no_chain_unless_asked(tiny_ckpt, tmp_path):
    sample(
        compose_cfg("sample", [f"ckpt_path={tiny_ckpt}", "num_samples=2", "sampler.num_steps=3"], tmp_path), tmp_path
    )
    assert (tmp_path / "grid.png").is_file() and not (tmp_path / "chain.png").exists()
