"""Every config value that can be checked is checked before training starts: one line naming the key and the fix,
exit status 2 from the CLI, and nothing written."""

import pytest
from omegaconf import OmegaConf

from conftest import TINY, run_cli
from ddpmlab.cli.sample import sample
from ddpmlab.diffusion import GaussianDiffusion, linear_betas
from ddpmlab.errors import ConfigError
from ddpmlab.samplers import Sampler
from ddpmlab.training import train
from ddpmlab.validate import check_train_config
from fixtures_data import make_folder


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["schedule=linear", "schedule.beta_start=0.03"],
            "schedule.beta_start=0.03 must be below schedule.beta_end=0.02",
        ),  # fmt: skip
        (["model.channel_mult=[]"], "model.channel_mult=[] must be a non-empty list of positive integers"),
        (["sampler.num_steps=100"], "sampler.num_steps=100 is more than the schedule's T=50 steps"),
        (["sampler=ddim", "sampler.eta=-1"], "sampler.eta=-1 is outside [0, inf)"),
        (["sampler.spacing=uniform"], "unknown sampler.spacing 'uniform'; choose one of"),
        (["sampler.clip_x0=maybe"], "sampler.clip_x0='maybe' must be true or false"),
        (["schedule.num_timesteps=1"], "schedule.num_timesteps=1 must be an integer >= 2"),
        (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be an integer >= 1 or -1"),
        (["prediction=foo"], "prediction='foo' is not a parameterization; choose one of eps, x0, v"),
        (["optimizer.lr=-1"], "optimizer.lr=-1 is outside (0, inf)"),
        (["p_uncond=1.5"], "p_uncond=1.5 is outside [0, 1)"),
    ],
)
def test_bad_values_are_refused_before_training(train_cfg, tmp_path, args, expected):
    with pytest.raises(ConfigError) as e:
        train(train_cfg(*args))
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing written: no checkpoint, no metrics


@pytest.mark.parametrize(
    "args",
    [
        ["sampler=ddim", "sampler.eta=-1"],
        ["sampler=ddim", "sampler.eta=abc"],
        ["sampler.num_steps=0"],
        ["sampler.num_steps=100"],
        ["sampler.spacing=uniform"],
        ["sampler.variance=medium"],
        ["sampler.clip_x0=maybe"],
        ["sampler.algorithm=nope"],
        ["sampler.algorithm=euler"],  # ddpm's variance key, which euler does not take
    ],
)
def test_a_sampler_value_has_one_check_and_one_message(train_cfg, args):
    """The training config's check and the Sampler built from the same section refuse a bad value with the same
    line: one check (samplers.sampler.check_sampler_config), whichever way the value comes in."""
    cfg = train_cfg(*args)
    with pytest.raises(ConfigError) as from_config:
        check_train_config(cfg)
    diffusion = GaussianDiffusion(linear_betas(cfg.schedule.num_timesteps))
    with pytest.raises(ConfigError) as from_python:
        Sampler.from_config(OmegaConf.to_container(cfg.sampler)).timesteps(diffusion)
    assert str(from_config.value) == str(from_python.value)
    assert str(from_config.value).startswith(("sampler.", "unknown sampler", "sampler 'euler' has no")), args


def test_sample_py_refuses_a_bad_sampler_value_before_reading_the_checkpoint(tmp_path):
    from conftest import compose_cfg

    cfg = compose_cfg("sample", ["ckpt_path=/nonexistent/last.ckpt", "sampler.eta=-1"], tmp_path)
    with pytest.raises(ConfigError, match=r"^sampler.eta=-1 is outside \[0, inf\)"):
        sample(cfg, tmp_path / "o")


def test_sample_py_without_ckpt_path_is_one_line(tmp_path):
    r = run_cli("sample.py", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (
        r.stderr.strip() == "ddpmlab: error: ckpt_path is required: python sample.py "
        "ckpt_path=<run dir>/checkpoints/last.ckpt"
    )


def test_sample_steps_above_the_checkpoints_T_are_refused(tmp_path):
    from conftest import compose_cfg

    run = tmp_path / "trained"
    train(compose_cfg("train", TINY + ["trainer.max_steps=1"], run))
    cfg = compose_cfg("sample", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "sampler.num_steps=51"], tmp_path)
    with pytest.raises(ConfigError, match=r"sampler.num_steps=51 is more than the schedule's T=50"):
        sample(cfg, tmp_path / "o")


def test_a_truncated_image_in_a_worker_is_one_line(tmp_path):
    make_folder(tmp_path / "images", classes=("a",), per_class=8)
    victim = tmp_path / "images" / "a" / "img_0.jpg"
    victim.write_bytes(victim.read_bytes()[:100])
    r = run_cli(
        "train.py",
        *TINY,
        "data=folder",
        f"data.root={tmp_path / 'images'}",
        "data.image_size=8",
        "data.batch_size=8",
        "data.val_fraction=0",
        "data.num_workers=1",
        "trainer.max_steps=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=180,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ddpmlab: error: cannot read image {victim} (")
    assert last.endswith("replace or remove that file")
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))  # failed at step 0: nothing to keep
