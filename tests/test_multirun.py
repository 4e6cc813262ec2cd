"""`python train.py -m ...`: a sweep of tiny jobs in distinct run directories, ending with a summary; the
SLURM launcher config composes."""

import csv
import json

import pytest

from conftest import TINY, compose_cfg, run_cli
from ddpmlab.cli.sweep import write_summary


def test_multirun_of_two_tiny_jobs_writes_distinct_runs_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    fast = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.checkpoint", "trainer.val_check"))]
    res = run_cli(
        "train.py",
        "-m",
        "schedule=linear,cosine",
        *fast,
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "callbacks.checkpoint.every_n_train_steps=3",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert f"schedule={schedule}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((sweep / job / "final_metrics.json").read_text())["step"] == 3
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert "schedule=linear" in rows[0]["overrides"] and "schedule=cosine" in rows[1]["overrides"]
    assert all(float(r["val/loss"]) > 0 for r in rows)
    assert "sweep summary:" in res.stdout


def test_summary_orders_jobs_numerically_and_skips_unfinished_ones(tmp_path):
    for job, loss in (("10", 0.3), ("2", 0.2)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "final_metrics.json").write_text(json.dumps({"step": 5, "val/loss": loss}))
    (tmp_path / "3").mkdir()  # a job that did not finish
    write_summary(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [(r["job"], float(r["val/loss"])) for r in rows] == [("2", 0.2), ("10", 0.3)]


def test_slurm_launcher_config_requeues_into_the_same_run_dir(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the `slurm` extra is not installed")
    cfg = compose_cfg(
        "train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path
    )
    from hydra.core.hydra_config import HydraConfig

    launcher = HydraConfig.get().launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 2
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # a timed-out job is requeued
    from datetime import timedelta

    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    strategy = instantiate(cfg.trainer.strategy)  # DDP, a rank waiting at most 10 minutes for the others
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=600)


def test_ddpm_cifar10_preset_is_the_papers_recipe(tmp_path):
    from ddpmlab.api import build_denoiser

    cfg = compose_cfg("train", ["experiment=ddpm_cifar10"], tmp_path)
    assert cfg.data.name == "cifar10" and cfg.data.batch_size == 128 and cfg.data.random_flip
    assert cfg.schedule._target_.endswith("linear_betas") and cfg.schedule.num_timesteps == 1000
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.lr_warmup_steps == 5000
    assert cfg.ema.decay == 0.9999 and not cfg.ema.warmup
    assert cfg.model.dropout == 0.1 and cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.max_steps == 800_000
    assert cfg.sampler.algorithm == "ddpm" and cfg.sampler.variance == "large" and cfg.sampler.num_steps is None
    assert "fid" in cfg.callbacks
    assert sum(p.numel() for p in build_denoiser(cfg).parameters()) == 35_746_307  # 35.7M (DDPM Appendix B)


@pytest.mark.parametrize("name,data,size", [("ddpm_mnist", "mnist", 28), ("ddpm_celeba64", "celeba", 64)])
def test_other_presets_compose(tmp_path, name, data, size):
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
    assert cfg.data.name == data and cfg.model.image_size == size and cfg.sampler.variance == "large"
