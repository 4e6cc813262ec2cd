"""Resume never loses work: it picks the furthest complete checkpoint, continues bit for bit, keeps the metrics
history, and a bad ckpt_path fails before anything is written."""

import csv
import shutil

import pytest
import torch

from ddpmlab.errors import CheckpointError
from ddpmlab.training import resume_path, train

# 12 batches of 128 per epoch of the digits' training split: 9 + 9 steps cross an epoch boundary.
EXACT = [
    "data.batch_size=128",
    "trainer.val_check_interval=4",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.sample_grid.every_n_steps=0",
    "trainer.log_every_n_steps=1",
]


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}[{k}] differs by {(a[key][k] - b[key][k]).abs().max()}"
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"Adam state {i}.{k} differs"
    assert torch.equal(a["averaging_state"]["n_averaged"], b["averaging_state"]["n_averaged"])


@pytest.mark.parametrize(
    "on_device,dropout,task",
    [(False, 0.0, None), (True, 0.0, None), (False, 0.3, None), (True, 0.0, "inpaint_digits")],
    ids=["dataloader", "device_loader", "dropout", "inpainting_masks_and_condition_dropout"],
)
def test_stopping_and_resuming_gives_the_straight_run_bit_for_bit(train_cfg, tmp_path, on_device, dropout, task):
    extra = [*EXACT, f"data.on_device={on_device}", f"model.dropout={dropout}"]
    if task:  # random masks and condition dropout drawn each step: a resumed run draws the same
        extra += [f"experiment={task}", "p_uncond=0.3"]
    train(train_cfg(*extra, "trainer.max_steps=9", run_dir=tmp_path / "a"))
    train(train_cfg(*extra, "trainer.max_steps=18", "ckpt_path=last", run_dir=tmp_path / "a"))
    train(train_cfg(*extra, "trainer.max_steps=18", run_dir=tmp_path / "b"))
    a, b = (load(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("a", "b"))
    assert a["global_step"] == 18
    assert_same_training_state(a, b)
    # and the logged losses of the resumed segment are the straight run's
    loss = lambda run: {r["step"]: r["train/loss"] for r in rows(run) if r.get("train/loss")}
    assert loss(tmp_path / "a") == loss(tmp_path / "b")


def test_metrics_history_survives_resume(train_cfg, tmp_path):
    run = tmp_path / "run"
    train(train_cfg())
    first = rows(run)
    train(train_cfg("trainer.max_steps=9"))
    after = rows(run)
    assert after[: len(first)] == [{k: r.get(k, "") for k in after[0]} for r in first]  # every earlier row kept
    steps = sorted({int(r["step"]) for r in after if r.get("train/loss")})
    assert steps == list(range(9))  # 0..5 from the first run, 6..8 from the resumed one


def test_resume_picks_the_highest_step_not_the_newest_file(train_cfg, tmp_path):
    """A kill between step_N.ckpt and last.ckpt leaves an older last.ckpt beside the complete step_N.ckpt."""
    run = tmp_path / "run"
    train(train_cfg("trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3"))
    ckpts = run / "checkpoints"
    assert load(ckpts / "step_0000006.ckpt")["global_step"] == 6
    train(train_cfg("trainer.max_steps=3", run_dir=tmp_path / "early"))
    shutil.copy(tmp_path / "early" / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")  # newer file, step 3
    (ckpts / "on_exception.ckpt").write_bytes(b"")  # a partial file, newest of all
    with pytest.warns(UserWarning, match="skipping .*on_exception.ckpt"):
        assert resume_path(train_cfg("ckpt_path=last"), run) == str(ckpts / "step_0000006.ckpt")
    (ckpts / "on_exception.ckpt").unlink()
    train(train_cfg("ckpt_path=last", "trainer.max_steps=8"))
    assert load(ckpts / "last.ckpt")["global_step"] == 8
    assert not list(ckpts.glob("last-v*.ckpt"))


def test_a_moved_run_directory_resumes_into_its_own_last_ckpt(train_cfg, tmp_path):
    train(train_cfg())
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)  # the checkpoints' callback state names the old directory
    train(train_cfg("trainer.max_steps=9", run_dir=moved))
    assert load(moved / "checkpoints" / "last.ckpt")["global_step"] == 9
    assert not list((moved / "checkpoints").glob("last-v*.ckpt"))


@pytest.mark.parametrize("bad", ["missing", "empty", "truncated", "other_model"])
def test_a_bad_ckpt_path_is_refused_before_anything_is_written(train_cfg, tmp_path, bad):
    run = tmp_path / "run"
    train(train_cfg())
    ckpts = run / "checkpoints"
    good = load(ckpts / "last.ckpt")
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    target = tmp_path / "given.ckpt"
    extra = []
    if bad == "empty":
        target.write_bytes(b"")
    elif bad == "truncated":
        target.write_bytes((ckpts / "last.ckpt").read_bytes()[:4000])
    elif bad == "other_model":
        target = ckpts / "last.ckpt"
        extra = ["model.base_channels=8", "model.num_groups=4"]
    with pytest.raises(CheckpointError, match="no checkpoint at|not a readable checkpoint|different 'model'"):
        train(train_cfg(f"ckpt_path={target}", "trainer.max_steps=12", *extra))
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # no on_exception.ckpt, nothing changed
    assert load(ckpts / "last.ckpt")["global_step"] == good["global_step"]
    # and the next plain resume still continues from step 6
    assert resume_path(train_cfg("ckpt_path=last"), run) == str(ckpts / "last.ckpt")


def test_a_failure_before_the_first_step_writes_no_checkpoint(train_cfg, tmp_path, monkeypatch):
    from ddpmlab.lit.module import DiffusionModule

    def broken(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(DiffusionModule, "training_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(train_cfg())
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_tensorboard_and_wandb_keep_the_history_across_resume(train_cfg, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    loggers = ["logger=[csv,tensorboard,wandb]"]
    run = tmp_path / "run"
    train(train_cfg(*loggers))
    train(train_cfg(*loggers, "trainer.max_steps=9"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(9))  # both segments' events are read
    import wandb

    wandb.teardown()
    run_id = (run / "wandb_run_id").read_text()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both segments log to one W&B run


def test_a_checkpoint_older_than_a_model_key_resumes_at_that_keys_default(train_cfg, tmp_path):
    """A checkpoint written before ``model.cond_channels`` existed stored no such key: it was trained with the
    network's default (0), so it resumes; a real difference in the key is still refused."""
    run = tmp_path / "a"
    train(train_cfg(*EXACT, "trainer.max_steps=4", run_dir=run))
    last = run / "checkpoints" / "last.ckpt"
    ckpt = load(last)
    del ckpt["ddpmlab_config"]["model"]["cond_channels"]
    torch.save(ckpt, last)
    train(train_cfg(*EXACT, "trainer.max_steps=8", "ckpt_path=last", run_dir=run))
    assert load(last)["global_step"] == 8
    with pytest.raises(CheckpointError, match="model.cond_channels: checkpoint 0, this run 1"):
        train(train_cfg(*EXACT, "trainer.max_steps=12", "ckpt_path=last", "model.cond_channels=1", run_dir=run))
