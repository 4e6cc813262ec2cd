"""hparams_search: Hydra's Optuna sweeper over train.py, minimising optimized_metric from the last validation."""

import importlib.util

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import run_cli
from ddpmlab.cli.train import optimized_value
from ddpmlab.errors import ConfigError


def test_optimized_metric_is_returned_or_a_clear_error():
    assert optimized_value(OmegaConf.create({"optimized_metric": None}), {"val/loss": 0.5}) is None
    assert optimized_value(OmegaConf.create({"optimized_metric": "val/loss"}), {"val/loss": 0.5}) == 0.5
    with pytest.raises(ConfigError, match=r"optimized_metric='val/fid' was never logged .*callbacks=fid"):
        optimized_value(OmegaConf.create({"optimized_metric": "val/fid"}), {"val/loss": 0.5})


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="the Optuna sweeper is an optional extra: pip install -e '.[optuna]'",
)
def test_two_optuna_trials_on_the_tiny_network(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train.py",
        "-m",
        "hparams_search=digits_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={sweep}",
        "model=unet_tiny",
        "schedule.num_timesteps=50",
        "data.batch_size=32",
        "trainer.max_steps=4",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_grid.num_steps=5",
        "callbacks.sample_grid.num_samples=4",
        "extras.print_config=false",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0 < results["best_value"] < 10 and "optimizer.lr" in results["best_params"]
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all("optimizer.lr=" in r for r in rows[1:])
