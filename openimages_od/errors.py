"""Error types shared by every stage.

User errors carry an exit code and a one-line message that names what was
wrong and where; the CLI prints them without a traceback. Storage errors are
``OSError`` subclasses (see :mod:`openimages_od.storage`).
"""

from __future__ import annotations


class OiodError(Exception):
    """Base class for errors caused by the user's input or environment.

    Attributes:
        exit_code: process exit code the CLI uses for this error.
    """

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(OiodError):
    """The configuration is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class UsageError(OiodError):
    """A command-line argument or selection is invalid (exit code 2)."""

    exit_code = 2


class DataError(OiodError):
    """Input data (a metadata file, a plan, a shard) is malformed."""

    exit_code = 1
