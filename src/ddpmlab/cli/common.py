"""What the entry points share: printing user errors as one line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
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


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one clear line and exit with status 2; let real bugs show their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            err = user_error(e)
            if err is None:
                raise
            print(f"ddpmlab: error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)

    return wrapper
