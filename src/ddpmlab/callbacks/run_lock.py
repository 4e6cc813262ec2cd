"""One training at a time in a run directory.

``train()`` holds ``<run dir>/.lock`` (an exclusive ``fcntl.flock``) from before it picks the checkpoint to resume
until it returns, and refuses to start when another process holds it. ``python train.py`` takes it earlier still,
before Hydra writes ``.hydra/`` (:class:`RunDirLock`, a Hydra callback), so a refused run changes nothing in the
directory of the one that holds it. The kernel drops the lock when its process ends, however it ends (SIGKILL, the
out-of-memory killer): a lock left by a dead run never blocks a resume. The file holds the holder's process id and
host for the refusal; it stays after the run (removing it would let two processes lock two files of one name).

Under DDP only the process that starts the run takes the lock: Lightning's launcher, torchrun and SLURM start the
other ranks with their rank in the environment, and they write into the directory that rank 0 holds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ddpmlab.errors import CheckpointError, ConfigError

LOCK_NAME = ".lock"
# The variables in which launchers tell a process its rank (Lightning, torchrun, SLURM, multi-node by hand).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
_held: dict[Path, list[int]] = {}  # run dir -> [file descriptor, depth]: the locks this process holds


class RunDirBusyError(ConfigError):
    """Another live process is training in the run directory."""


def starts_the_run() -> bool:
    """Whether this process is the one that starts a run (global rank 0, or no launcher at all)."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def acquire(run_dir: str | Path) -> None:
    """Lock ``run_dir`` for this process (again, if it holds it already), or raise :class:`RunDirBusyError`."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"cannot write in the run directory {key} ({e.strerror}); pick another hydra.run.dir") from e
    try:
        locked = _lock(fd, key)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        _held[key] = [-1, 1]
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    _held[key] = [fd, 1]


def _lock(fd: int, key: Path) -> bool:
    """Lock ``fd`` exclusively: True; False on a filesystem that cannot lock (some network mounts)."""
    for _ in range(3):  # a process asking who holds the lock (holder) holds it for an instant: try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            rank_zero_warn(f"ddpmlab: {key} cannot be locked ({e.strerror}): a second run in it would not be refused")
            return False
    raise RunDirBusyError(
        f"{key} is in use by another training ({_describe(fd)}); wait for it to end or stop it, or write this run "
        "elsewhere (hydra.run.dir=<another dir>)"
    )


def release(run_dir: str | Path) -> None:
    key = Path(run_dir).resolve()
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        fd = _held.pop(key)[0]
        if fd >= 0:
            os.close(fd)  # closing the file drops the lock


@contextmanager
def hold(run_dir: str | Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` inside the block (a DDP rank other than 0: nothing to hold)."""
    if not starts_the_run():
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def holds(run_dir: str | Path) -> bool:
    """Whether this process holds the lock of ``run_dir``."""
    return Path(run_dir).resolve() in _held


def holder(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir`` (its process and host) if another live process does, else None."""
    key = Path(run_dir).resolve()
    if holds(key):
        return None
    try:
        fd = os.open(key / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once by the close below
    except BlockingIOError:
        return _describe(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def check_resume_source(ckpt_path: str | Path) -> None:
    """Refuse to resume from a checkpoint of a run directory that another process is still training in: both
    runs would go on from one state (and one W&B run), each unaware of the other."""
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints":
        return
    busy = holder(path.parent.parent)
    if busy:
        raise CheckpointError(
            f"{path} belongs to the run in {path.parent.parent}, which {busy} is still training; resume it once "
            "that run has ended, or copy the checkpoint elsewhere to start a run from it"
        )


def _describe(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "a process that has just started"


class RunDirLock(Callback):
    """Hydra callback: ``python train.py`` locks its run directory before Hydra writes anything into it."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if not starts_the_run():
            return
        try:
            acquire(str(config.hydra.run.dir))
        except ConfigError as e:  # the CLI's one line; not friendly_errors, whose clean-up must not touch this dir
            print(f"ddpmlab: error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        if starts_the_run():
            release(str(config.hydra.run.dir))
