"""All exceptions core raises on purpose. Each maps to a CLI exit code (see `exit_code`)."""
from __future__ import annotations


class CoreError(Exception):
    """Base class: an error with a message meant for the user."""


class ConfigError(CoreError):
    """The config (YAML or --set) is invalid: names the key, the value and what is allowed. Exit 2."""


class DataError(CoreError):
    """The dataset is missing, unreadable or unusable (too few classes, empty class, ...). Exit 2."""


class TrainingError(CoreError):
    """Training itself failed (NaN/inf loss, ...). Exit 1."""


class ExportError(CoreError):
    """Export failed or its verification (parity) failed. Exit 1."""


class RunDirError(CoreError):
    """A run folder is missing or half-written. Exit 2."""


class Cancelled(CoreError):
    """The run was asked to stop (SIGTERM). Exit 1."""


def exit_code(err: BaseException) -> int:
    """CLI exit code for an exception: 2 for bad input, 1 for everything else."""
    return 2 if isinstance(err, (ConfigError, DataError, RunDirError)) else 1
