"""A SIGTERM mid-run (a cluster's pre-emption or time limit) leaves a checkpoint at the step it stopped,
and `ckpt_path=last` with the same run directory continues from there."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from lightning.pytorch import Callback

from conftest import REPO, TINY
from ddpmlab.errors import CheckpointError
from ddpmlab.training import resume_path, train


def logged_steps(run):
    try:
        with open(run / "metrics.csv") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    except (FileNotFoundError, KeyError, ValueError):
        return []


def test_sigterm_leaves_a_checkpoint_that_ckpt_path_last_resumes(train_cfg, tmp_path):
    run = tmp_path / "run"
    # No periodic checkpoint and no validation within reach: whatever is saved, SIGTERM saved it.
    args = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.checkpoint.every"))]
    args += [
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "callbacks.checkpoint.every_n_train_steps=100000",
        "callbacks.sample_grid.every_n_steps=0",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while len(logged_steps(run)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM at step" in out
    saved = run / "checkpoints" / "on_exception.ckpt"
    assert not (run / "checkpoints" / "last.ckpt").exists()
    k = torch.load(saved, weights_only=True)["global_step"]
    assert k >= 3

    # resume: the same run directory, ckpt_path=last, three more steps
    assert resume_path(train_cfg("ckpt_path=last", run_dir=run), run) == str(saved)
    before = logged_steps(run)
    train(
        train_cfg(
            "ckpt_path=last", f"trainer.max_steps={k + 3}", "callbacks.checkpoint.every_n_train_steps=1", run_dir=run
        )
    )
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == k + 3
    assert int(next(iter(last["optimizer_states"][0]["state"].values()))["step"]) == k + 3  # Adam went on counting
    after = logged_steps(run)
    assert after[: len(before)] == before  # metrics.csv kept the first segment's rows
    assert min(after[len(before) :]) >= k  # the resumed segment logged from the saved step on
    assert not saved.exists()  # a finished run removes its on_exception.ckpt


def test_ckpt_path_last_without_a_checkpoint_says_where_it_looked(train_cfg, tmp_path):
    cfg = train_cfg("ckpt_path=last")
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: no complete checkpoint .* in .*run/checkpoints"):
        resume_path(cfg, tmp_path / "run")
    assert resume_path(train_cfg(), tmp_path / "run") is None  # null: a fresh start


def test_resume_skips_unreadable_checkpoints_and_takes_a_given_path_as_is(train_cfg, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "on_exception.ckpt").write_bytes(b"")  # what a full disk used to leave
    (ckpts / "last.ckpt").write_bytes(b"x")
    with pytest.warns(UserWarning, match="skipping .*last.ckpt"):
        assert resume_path(train_cfg(), tmp_path / "run") is None  # nothing complete: a fresh start
    assert resume_path(train_cfg("ckpt_path=/some/file.ckpt"), tmp_path / "run") == "/some/file.ckpt"


class SendSignalAt(Callback):
    """Sends ``signum`` to this process once, after training step ``step``."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_submitit_requeue_signal_first_saves_at_a_step_boundary_then_requeues(train_cfg, tmp_path, monkeypatch):
    """submitit's USR2 handler would requeue and exit mid-step; train() runs it only after Lightning has
    stopped at a step boundary and saved on_exception.ckpt."""
    calls = []

    def submitit_handler(signum, frame):  # what submitit does: pickle the job, requeue it, exit
        calls.append((signum, (tmp_path / "run" / "checkpoints" / "on_exception.ckpt").is_file()))
        sys.exit(-1)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        cfg = train_cfg(
            "trainer.max_steps=100",
            "+callbacks.kill._target_=test_sigterm.SendSignalAt",
            "+callbacks.kill.step=4",
            f"+callbacks.kill.signum={int(signal.SIGUSR2)}",
        )
        with pytest.raises(SystemExit) as exit_info:
            train(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exit_info.value.code == -1 and calls == [(signal.SIGUSR2, True)]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "on_exception.ckpt", weights_only=True)
    assert saved["global_step"] in (4, 5)  # the step boundary after the signal, not the middle of a step
