"""The one exception tree of dkit.

Every error a user can cause or fix is a ``DkitError``. Its ``exit_code`` is what the CLI
returns (the mapping lives here and only here): 1 when the user must act (bad input, a
refused key, a wrong passphrase), 2 for usage errors (a malformed option value).

Messages never carry secret bytes: they name the file, the key reference or the problem.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ACTION = 1
EXIT_USAGE = 2


class DkitError(Exception):
    """Base class. ``hint`` is an optional second line telling the user what to do."""

    exit_code = EXIT_ACTION

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ParameterError(DkitError):
    """Invalid key parameters: a malformed shape, a block that does not tile, an unknown mechanism."""

    exit_code = EXIT_USAGE


class KeyNotFound(DkitError):
    """No key of that name, or no such version."""


class KeyStateError(DkitError):
    """The key exists but the operation is refused in its state (disabled, destroyed, primary)."""


class KeyExists(DkitError):
    """A key of that name exists already."""


class KeyMismatch(DkitError):
    """An artifact was made with another key (or key version) than the one offered."""


class SecretBackendError(DkitError):
    """The secret store (OS keyring or file store) is unavailable or refused an operation."""


class PassphraseError(DkitError):
    """A passphrase is missing, too short, or wrong."""


class StoreCorrupt(DkitError):
    """A dkit state file (key records, file store) cannot be read as written by dkit."""


class BackupError(DkitError):
    """A key backup file is malformed, truncated, edited, or does not match its contents."""


class InputError(DkitError):
    """Bad input data: an image or array that cannot be used with the key's geometry."""


class FormatError(DkitError):
    """A file is not a dkit file, or is of a version this dkit cannot read."""


class ArtifactError(DkitError):
    """A model artifact is malformed or unsafe to load."""
