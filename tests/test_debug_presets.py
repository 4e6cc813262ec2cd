"""The debug presets (python train.py debug=<preset>), each run through train(cfg) on the tiny network."""

import json

from conftest import compose_cfg
from ddpmlab.training import train

SMALL = [
    "model=unet_tiny",
    "schedule.num_timesteps=50",
    "data.batch_size=32",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.num_steps=5",
    "extras.print_config=false",
]


def run(tmp_path, preset, *extra):
    cfg = compose_cfg("train", [f"debug={preset}", *SMALL, *extra], tmp_path / "run")
    metrics = train(cfg)
    return cfg, metrics, json.loads((tmp_path / "run" / "final_metrics.json").read_text())


def test_fdr_runs_one_step_and_writes_no_grid_chain_or_checkpoint(tmp_path):
    cfg, metrics, final = run(tmp_path, "fdr")
    assert cfg.task_name == "debug" and cfg.trainer.fast_dev_run is True
    assert final["step"] == 1 and "val/loss" in metrics
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert not written & {"checkpoints", "grids", "chains", "forward", "metrics.csv"}, written


def test_limit_runs_every_stage_on_a_few_batches(tmp_path):
    cfg, _, final = run(tmp_path, "limit")
    run_dir = tmp_path / "run"
    assert final["step"] == 12
    assert sorted(p.name for p in (run_dir / "grids").glob("*.png")) == ["step_0000006.png", "step_0000012.png"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    epochs = {line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]}
    assert {"0", "1", "2", "3"} <= epochs  # 3 batches an epoch: 12 steps are 4 epochs


def test_overfit_trains_on_the_same_batches(tmp_path):
    cfg, _, final = run(
        tmp_path,
        "overfit",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "callbacks.sample_grid.every_n_steps=3",
    )
    assert cfg.trainer.overfit_batches == 2 and final["step"] == 6
    epochs = {line.split(",")[0] for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]}
    assert max(int(e) for e in epochs if e) == 2  # 2 batches an epoch: steps 5 and 6 are epoch 2


def test_profiler_writes_its_report_in_the_run_directory(tmp_path):
    run(
        tmp_path,
        "profiler",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "callbacks.sample_grid.every_n_steps=0",
    )
    report = (tmp_path / "run" / "fit-profiler.txt").read_text()
    assert "run_training_batch" in report
