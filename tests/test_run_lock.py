"""One training at a time in a run directory: a second run, or a resume, in a directory another live process holds
is refused with one line naming that process, before anything is written; a holder killed with SIGKILL leaves
nothing that blocks the next run; DDP ranks other than 0 do not take the lock."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import run_cli
from ddpmlab.callbacks.run_lock import LOCK_NAME, RunDirBusyError, hold, holder
from ddpmlab.errors import CheckpointError
from ddpmlab.training import train

# Another process in the run directory, holding it as a training does (the same acquire: an exclusive flock on
# <run dir>/.lock, its process id and host written over whatever an earlier holder left there).
HOLD = """
import sys, time
from ddpmlab.callbacks.run_lock import acquire
acquire(sys.argv[1])
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def other_process():
    """``other_process(run_dir)``: a live process that holds ``run_dir``'s lock until the test kills it."""
    procs = []

    def start(run_dir):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_in_a_held_directory_is_refused_and_a_killed_holder_blocks_nothing(train_cfg, tmp_path, other_process):
    run = tmp_path / "run"
    first = other_process(run)
    before = files(run)
    with pytest.raises(RunDirBusyError) as e:
        train(train_cfg("trainer.max_steps=2"))
    assert f"is in use by another training (process {first.pid} on host {socket.gethostname()})" in str(e.value)
    assert "\n" not in str(e.value) and files(run) == before  # nothing written
    first.kill()  # SIGKILL: the kernel drops its lock, the file stays
    first.wait()
    train(train_cfg("trainer.max_steps=2"))
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / LOCK_NAME).is_file()
    assert holder(run) is None  # train() let go when it returned


def test_resume_of_a_held_run_is_refused(train_cfg, tmp_path, other_process):
    run = tmp_path / "run"
    train(train_cfg("trainer.max_steps=2"))
    other_process(run)
    before = files(run)
    with pytest.raises(RunDirBusyError, match="is in use by another training"):
        train(train_cfg("trainer.max_steps=4", "ckpt_path=last"))
    # ... and so is starting elsewhere from one of its checkpoints: both would continue one state (one W&B run)
    with pytest.raises(CheckpointError, match=r"belongs to the run in .*, which process \d+ on host .* is still"):
        train(
            train_cfg("trainer.max_steps=4", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path / "b")
        )
    assert files(run) == before


def test_ddp_ranks_other_than_0_do_not_take_the_lock(tmp_path, other_process, monkeypatch):
    other_process(tmp_path / "run")
    with pytest.raises(RunDirBusyError):
        with hold(tmp_path / "run"):
            pass
    for variable in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
        with monkeypatch.context() as m:
            m.setenv(variable, "1")
            with hold(tmp_path / "run"):  # rank 1 writes into the directory its rank 0 holds
                pass


def test_nested_holds_in_one_process_share_the_lock(tmp_path):
    with hold(tmp_path / "run"):
        with hold(tmp_path / "run"):  # python train.py: the Hydra callback, then train() itself
            pass
        assert holder(tmp_path / "run") is None
        probe = subprocess.run(
            [sys.executable, "-c", "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), "
             "fcntl.LOCK_SH | fcntl.LOCK_NB)", str(tmp_path / "run" / LOCK_NAME)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr  # still held after the inner block


def test_a_second_train_py_is_refused_before_hydra_writes_into_the_run(tmp_path, other_process):
    run = tmp_path / "run"
    first = other_process(run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")  # the first run's saved config
    before = files(run)
    res = run_cli("train.py", "seed=2", "trainer.max_steps=2", f"hydra.run.dir={run}", cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"ddpmlab: error: {run} is in use by another training (process {first.pid} on host {socket.gethostname()}); "
        "wait for it to end or stop it, or write this run elsewhere (hydra.run.dir=<another dir>)"
    )
    assert files(run) == before  # .hydra/config.yaml still the first run's; no log, no metrics


def test_a_train_py_refused_for_bad_input_still_leaves_no_run_directory(tmp_path):
    run = tmp_path / "outputs" / "run"
    res = run_cli("train.py", "optimizer.lr=-1", f"hydra.run.dir={run}", cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "ddpmlab: error: optimizer.lr=-1" in res.stderr, res.stderr[-2000:]
    assert not run.exists()  # its own lock file does not keep the empty run directory
