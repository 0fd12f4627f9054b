"""All exceptions core raises on purpose. Each maps to a CLI exit code (see `exit_code`)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self


@dataclass(frozen=True)
class FieldError:
    """One thing wrong with one key: the dotted key ("" when the error belongs to no single key), the value given
    (None when there is none) and what is wrong, without the key. `str()` is the line the CLI prints."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class CoreError(Exception):
    """Base class: an error with a message meant for the user."""


class FieldErrors(Exception):
    """Mixin of errors about keys (core's ConfigError, worker's SubmissionError): `errors` holds one FieldError per
    bad key, so a form can place each under its field; `str(err)` is the whole message. An error made from a message
    alone has one FieldError with key ""."""

    def __init__(self, message: str, errors: Iterable[FieldError] = ()) -> None:
        super().__init__(message)
        self.errors: tuple[FieldError, ...] = tuple(errors) or (FieldError("", None, message),)

    @classmethod
    def on(cls, key: str, value: Any, message: str) -> Self:
        """The error of one key: its message reads "key: message"."""
        error = FieldError(key, value, message)
        return cls(str(error), [error])


class ConfigError(FieldErrors, CoreError):
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
