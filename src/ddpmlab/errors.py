"""User-facing errors: raised for bad input, printed by the CLI as one short line (no traceback)."""


class ConfigError(ValueError):
    """A configuration value or input file that cannot work; the message says how to fix it."""


class DatasetNotFoundError(ConfigError, FileNotFoundError):
    """A dataset's files are missing and cannot be downloaded."""


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable or from an incompatible config."""


class DiskFullError(CheckpointError):
    """No room left to write a checkpoint; the checkpoints already there are intact."""


class NotWritableError(CheckpointError):
    """A directory a run writes into refuses files (read-only, another user's); nothing there was changed."""
