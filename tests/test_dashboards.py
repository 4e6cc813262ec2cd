"""Dashboards that line up: callback scalars at Lightning's step, the last step of a short run logged,
chains upscaled like the grids, no hp_metric placeholder, W&B grouped by sweep, a labelled samples table."""

import csv

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ddpmlab.training import train


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def steps_with(table, key):
    return {int(r["step"]) for r in table if r.get(key)}


def test_callback_scalars_share_lightnings_step_and_a_short_run_logs_its_last_step(train_cfg, tmp_path):
    train(train_cfg("trainer.log_every_n_steps=4", "trainer.max_steps=6"))
    table = rows(tmp_path / "run")
    assert steps_with(table, "train/loss") == {3, 5}  # step 4 (Lightning's index 3), then the last step
    callback_steps = steps_with(table, "train/loss_q1") | steps_with(table, "train/img_per_sec")
    assert callback_steps <= steps_with(table, "train/loss")


def test_a_run_shorter_than_the_logging_interval_still_writes_its_loss(train_cfg, tmp_path):
    train(train_cfg("trainer.log_every_n_steps=50", "trainer.max_steps=3", "trainer.val_check_interval=3"))
    assert steps_with(rows(tmp_path / "run"), "train/loss") == {2}


def test_chain_and_forward_images_are_upscaled_like_the_grids(train_cfg, tmp_path):
    train(train_cfg())
    run = tmp_path / "run"
    grid = Image.open(next((run / "grids").glob("*.png")))
    chain = Image.open(next((run / "chains").glob("*.png")))
    forward = Image.open(next((run / "forward").glob("*.png")))
    cell = 32 + 2  # 8x8 digits upscaled 4x, 2 px padding
    assert grid.size[1] % cell == 2 and chain.size[1] == 8 * cell + 2 and forward.size[1] == 8 * cell + 2


def test_tensorboard_has_no_hp_metric_placeholder(train_cfg, tmp_path):
    logger = instantiate(train_cfg("logger=tensorboard").logger.tensorboard)
    assert logger._default_hp_metric is False


def test_wandb_group_is_the_sweep_directory():
    cfg = OmegaConf.create(
        {
            "multi": "${ddpm.sweep_group:RunMode.MULTIRUN,outputs/train-multirun/x}",
            "single": "${ddpm.sweep_group:RunMode.RUN,outputs/train-multirun/x}",
        }
    )
    assert cfg.multi == "outputs/train-multirun/x" and cfg.single is None


def test_conditional_run_logs_a_labelled_samples_table(monkeypatch, train_cfg, tmp_path):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    cfg = train_cfg(
        "logger=wandb",
        "model.num_classes=10",
        "trainer.max_steps=3",
        "callbacks.sample_grid.num_samples=10",
        "callbacks.sample_grid.every_n_steps=3",
    )
    assert cfg.logger.wandb.log_model is False and cfg.logger.wandb.group is None  # not a multirun
    train(cfg)
    import json

    import wandb

    wandb.teardown()
    [table_file] = (tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/samples/table_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["label", "image"]
    assert sorted(row[0] for row in table["data"]) == list(range(10))
