"""What the entry points share: printing user errors as one line."""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from ddpmlab.errors import ConfigError


def user_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc`` (Hydra wraps errors raised while instantiating), if any."""
    while exc is not None:
        if isinstance(exc, ConfigError):
            return exc
        if isinstance(exc, MissingMandatoryValue):
            key = exc.full_key
            return ConfigError(f"{key} is required (it is ??? in the config): set it as {key}=<value>")
        exc = exc.__cause__ or (exc.__context__ if isinstance(exc, InstantiationException) else None)
    return None


def one_line(err: ConfigError) -> str:
    """The message of ``err``; for one re-raised from a DataLoader worker (whose message carries the worker's
    traceback), the original message alone."""
    text = str(err)
    if text.startswith("Caught ") and "Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def discard_empty_run_dir() -> None:
    """Remove the Hydra run directory of a call that failed before writing anything: only Hydra's own
    ``.hydra/`` and an empty job log in it. A failed call leaves no empty ``outputs/<task>/<time>/`` behind."""
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        job_log = f"{HydraConfig.get().job.name}.log"
    except Exception:  # not under @hydra.main (tests call the functions directly)
        return
    if not run_dir.is_dir():
        return
    from ddpmlab.callbacks.run_lock import LOCK_NAME, holds

    mine = holds(run_dir)  # its lock file, if this call holds it (never another run's)
    entries = [p for p in run_dir.iterdir() if not (mine and p.name == LOCK_NAME)]
    if all(p.name == ".hydra" or (p.name == job_log and p.stat().st_size == 0) for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):  # outputs/<task>/ made for this call
            run_dir.parent.rmdir()


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one clear line and exit with status 2; let real bugs show their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            discard_empty_run_dir()
            err = user_error(e)
            if err is None:
                raise
            print(f"ddpmlab: error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)

    return wrapper
