"""The user's own configs: a ``conf/`` folder in the working directory (or ``$DDPMLAB_CONFIG_DIR``) comes first on
Hydra's search path, before the configs shipped inside the package."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import compose_cfg, run_cli

MINE = """# @package _global_
defaults:
  - override /model: unet_tiny
  - override /schedule: cosine

seed: 1234
trainer:
  max_steps: 77
"""


def write(folder, rel: str, text: str) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_experiment_in_conf_of_the_working_directory_is_found_by_name(tmp_path, monkeypatch):
    write(tmp_path, "conf/experiment/mine.yaml", MINE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DDPMLAB_CONFIG_DIR", raising=False)
    cfg = compose_cfg("train", ["experiment=mine"])
    assert (cfg.seed, cfg.trainer.max_steps) == (1234, 77)
    assert cfg.model.base_channels == compose_cfg("train", ["model=unet_tiny"]).model.base_channels
    assert "cosine" in cfg.schedule._target_


def test_a_user_file_with_a_shipped_name_replaces_the_shipped_one(tmp_path, monkeypatch):
    shipped = OmegaConf.to_container(compose_cfg("train", ["model=unet_tiny"]).model)
    write(tmp_path, "mine/model/unet_tiny.yaml", yaml.safe_dump({**shipped, "base_channels": 8}))
    monkeypatch.setenv("DDPMLAB_CONFIG_DIR", str(tmp_path / "mine"))  # the variable instead of ./conf
    assert compose_cfg("train", ["model=unet_tiny"]).model.base_channels == 8
    monkeypatch.delenv("DDPMLAB_CONFIG_DIR")
    monkeypatch.chdir(tmp_path)  # no ./conf here: the shipped configs alone
    assert compose_cfg("train", ["model=unet_tiny"]).model.base_channels == shipped["base_channels"]


def test_a_missing_config_dir_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMLAB_CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match="DDPMLAB_CONFIG_DIR=.*nowhere is not a folder"):
        compose_cfg("train", [])


def test_train_py_finds_conf_of_the_working_directory(tmp_path):
    write(tmp_path, "conf/experiment/mine.yaml", MINE)
    proc = run_cli("train.py", "experiment=mine", "--cfg", "job", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["seed"], cfg["trainer"]["max_steps"]) == (1234, 77)
