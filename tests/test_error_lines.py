"""Inputs that used to end in a traceback end in one line: a ConfigError or CheckpointError naming the file and the
fix (the CLI prints it as ``ddpmlab: error: ...`` and exits 2), raised before training starts where it can be."""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ddpmlab
from conftest import TINY, compose_cfg, run_cli
from ddpmlab.api import classifier_from_checkpoint
from ddpmlab.errors import CheckpointError, ConfigError, NotWritableError
from ddpmlab.stages import load_first_stage
from ddpmlab.training import train
from fixtures_data import datamodule, make_folder
from test_latent import AE, ae_ckpt, first_stage_run, ldm_overrides, ldm_run  # noqa: F401  (module fixtures)


def one_line(r):
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpmlab: error: "), r.stderr[-2000:]
    return lines[0]


def crafted(src, dst, edit):
    """A copy of the checkpoint ``src`` at ``dst`` with its stored config changed by ``edit(config)``."""
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt["ddpmlab_config"])
    torch.save(ckpt, dst)
    return dst


# ---------------------------------------------------------------------------------------------- latent diffusion
def test_evaluate_refuses_bits_per_dim_of_a_latent_checkpoint(ldm_run, tmp_path):  # noqa: F811
    ckpt = ldm_run / "checkpoints" / "last.ckpt"
    line = one_line(run_cli("evaluate.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path))
    assert f"{ckpt} is latent diffusion" in line and "metrics=[fid]" in line
    assert not (tmp_path / "e").exists()


def test_a_latent_resume_with_another_first_stage_architecture_is_refused(ldm_run, tmp_path):  # noqa: F811
    other = tmp_path / "ae16"
    train(compose_cfg("train", AE + ["first_stage.net.base_channels=16", "trainer.max_steps=2"], other))
    run = tmp_path / "ldm"
    shutil.copytree(ldm_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    cfg = compose_cfg("train", ldm_overrides(other / "checkpoints" / "last.ckpt", "ckpt_path=last"), run)
    with pytest.raises(
        CheckpointError,
        match=r"last.ckpt was trained on latents of another first stage \(first_stage.net.base_channels: "
        r"checkpoint 8, this run 16\); resume with the first_stage.ckpt_path it was trained with",
    ):
        train(cfg)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_unknown_keys_in_a_stored_first_stage_config(ae_ckpt, ldm_run, tmp_path):  # noqa: F811
    bad_ae = crafted(ae_ckpt, tmp_path / "ae.ckpt", lambda c: c["first_stage"]["net"].update(bogus=1))
    with pytest.raises(CheckpointError, match=r"ae.ckpt: its stored first_stage.net config has keys that "
                       r"Autoencoder does not take \(bogus\)"):  # fmt: skip
        load_first_stage(bad_ae)
    bad_ldm = crafted(
        ldm_run / "checkpoints" / "last.ckpt", tmp_path / "ldm.ckpt", lambda c: c["first_stage"]["net"].update(bogus=1)
    )
    with pytest.raises(CheckpointError, match=r"ldm.ckpt: its stored first_stage.net config has keys that"):
        ddpmlab.load(bad_ldm)


@pytest.fixture
def diffusers_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=8,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    return tmp_path / "vae"


def test_a_broken_diffusers_folder(diffusers_vae):
    config, weights = diffusers_vae / "config.json", diffusers_vae / "diffusion_pytorch_model.safetensors"
    good_config, good_weights = config.read_text(), weights.read_bytes()
    load_first_stage(diffusers_vae)

    config.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_first_stage(diffusers_vae)
    config.write_text(json.dumps({k: v for k, v in json.loads(good_config).items() if k != "in_channels"}))
    with pytest.raises(CheckpointError, match=r"config.json does not build a DiffusersAutoencoderKL \(KeyError"):
        load_first_stage(diffusers_vae)
    config.write_text(good_config)
    weights.write_bytes(good_weights[:100])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors is not a readable safetensors"):
        load_first_stage(diffusers_vae)


# ---------------------------------------------------------------------------------------------- stored configs
def test_unknown_keys_in_a_stored_classifier_config(tmp_path):
    config = OmegaConf.to_container(compose_cfg("train", ["experiment=classifier_digits"]), resolve=True)
    config["model"]["bogus"] = 1
    with pytest.raises(CheckpointError, match=r"classifier.ckpt_path: its stored model config has keys that "
                       r"NoisyClassifier does not take \(bogus\)"):  # fmt: skip
        classifier_from_checkpoint({"ddpmlab_config": config, "state_dict": {}})


def test_a_stored_prediction_that_is_not_eps_x0_or_v(tiny_ckpt, tmp_path):
    path = crafted(tiny_ckpt, tmp_path / "p.ckpt", lambda c: c.update(prediction="score"))
    with pytest.raises(CheckpointError, match=rf"{path}: its stored prediction='score' is not one of eps, x0, v"):
        ddpmlab.load(path)


def test_export_refusal_names_the_file(tiny_ckpt, tmp_path):
    from ddpmlab.cli.export import export

    path = crafted(tiny_ckpt, tmp_path / "t.ckpt", lambda c: c["model"].update(_target_="os.system"))
    with pytest.raises(CheckpointError, match=rf"^{path}: refused to build model._target_='os.system'"):
        export(path, tmp_path / "out")


@pytest.fixture
def exported(tiny_ckpt, tmp_path):
    pytest.importorskip("safetensors")
    from ddpmlab.cli.export import export

    return export(tiny_ckpt, tmp_path / "export")


def test_a_truncated_export_weights_file(exported):
    weights = exported / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        ddpmlab.load(exported)


@pytest.mark.parametrize(
    "text, match",
    [
        ("model: !!python/object/apply:os.system [true]\n", r"config.yaml is not a ddpmlab config \(could not "),
        ("- 1\n- 2\n", r"its config.yaml is not a config mapping \(a list\)"),
        ("model: [1\n", r"config.yaml is not a ddpmlab config \(while parsing"),
    ],
)
def test_a_tagged_list_valued_or_broken_export_config(exported, text, match):
    (exported / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        ddpmlab.load(exported)


# ---------------------------------------------------------------------------------------------- run directories
def test_a_checkpoint_directory_that_cannot_be_made_is_refused_before_the_first_step(train_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints go")
    with pytest.raises(NotWritableError, match=rf"cannot write in {run / 'checkpoints'} \(.*\), where this run "
                       r"keeps its checkpoints"):  # fmt: skip
        train(train_cfg())
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints"]  # the run lock alone was written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_directory_is_refused_before_the_first_step(train_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(NotWritableError, match=rf"cannot write in {run} \(Permission denied\)"):
            train(train_cfg())
    finally:
        run.chmod(0o755)


def test_a_checkpoint_directory_made_read_only_mid_run_is_one_line(train_cfg, tmp_path, monkeypatch):
    train(train_cfg())
    ckpts = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}

    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if Path(dir) == ckpts:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # after the up-front check: as a chmod of checkpoints/ mid-run
    with pytest.raises(NotWritableError, match=rf"cannot write step_0000009.ckpt in {ckpts} \(Permission denied\)"):
        train(train_cfg("trainer.max_steps=12"))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # no on_exception.ckpt tried either


# ---------------------------------------------------------------------------------------------- the command line
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None, reason="the Optuna sweeper is here"
)
def test_hparams_search_without_the_optuna_sweeper(tmp_path):
    r = run_cli("train.py", "hparams_search=digits_optuna", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    line = one_line(r)
    assert "hparams_search=digits_optuna runs Hydra's Optuna sweeper" in line and "pip install -e '.[optuna]'" in line


def test_a_bad_image_in_a_folder_is_found_before_training(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=4)
    datamodule("folder", root)
    bad = root / "dogs" / "img_1.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ConfigError, match=rf"cannot read image {bad} \(.*truncated.*\); replace or remove"):
        datamodule("folder", root)  # at setup, which train() runs before building the trainer
    r = run_cli("train.py", *TINY, "data=folder", f"data.root={root}", "data.image_size=8", "data.channels=3",
                "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert f"cannot read image {bad}" in one_line(r) and not (tmp_path / "run").exists()
