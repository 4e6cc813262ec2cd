"""A smoke training through train(cfg), the function the CLI calls; resume from last.ckpt."""

import csv

import torch

from ddpmlab.training import train


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_smoke_training_writes_checkpoint_grids_and_metrics(train_cfg, tmp_path):
    metrics = train(train_cfg())
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
    rows = read_metrics(run)
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert 0 < metrics["val/loss"] < 10
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # primitives only
    assert ckpt["global_step"] == 6
    assert ckpt["ddpmlab_config"]["model"]["base_channels"] == 16
    # EMA: the average lives in state_dict, the raw weights in current_model_state, and they differ
    key = next(k for k in ckpt["state_dict"] if k.endswith("conv_in.weight"))
    assert not torch.equal(ckpt["state_dict"][key], ckpt["current_model_state"][key])


def test_training_reduces_the_loss(train_cfg, tmp_path):
    train(
        train_cfg(
            "trainer.max_steps=60",
            "callbacks.sample_grid.every_n_steps=0",
            "trainer.val_check_interval=60",
            "optimizer.lr=3e-3",
        )
    )
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path / "run") if r.get("train/loss")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_resume_continues_step_count_optimizer_and_ema(train_cfg, tmp_path):
    train(train_cfg())
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # A new run directory resuming from the first run's last.ckpt, for 4 more steps.
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(train_cfg("trainer.max_steps=10", f"ckpt_path={ckpt}", run_dir=tmp_path / "resumed"))
    second = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 6 and second["global_step"] == 10
    adam_steps = lambda c: int(next(iter(c["optimizer_states"][0]["state"].values()))["step"])
    assert adam_steps(first) == 6 and adam_steps(second) == 10
    assert int(first["averaging_state"]["n_averaged"]) == 6 and int(second["averaging_state"]["n_averaged"]) == 10
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "resumed") if r.get("train/loss")]
    assert min(steps) >= 6  # logging continued from the saved step, not from 0


def test_a_run_directory_with_last_ckpt_resumes_by_itself(train_cfg, tmp_path):
    """A requeued job that reuses its run directory continues instead of starting over."""
    train(train_cfg())
    train(train_cfg("trainer.max_steps=9"))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_resume_refuses_a_checkpoint_from_another_model(train_cfg, tmp_path):
    import pytest

    from ddpmlab.errors import CheckpointError

    train(train_cfg())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="different 'model' config"):
        train(train_cfg("model.base_channels=8", "model.num_groups=4", f"ckpt_path={ckpt}", run_dir=tmp_path / "other"))


def test_training_without_any_logger(train_cfg, tmp_path):
    train(train_cfg("logger=none"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
