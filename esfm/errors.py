"""Exception hierarchy: every error esfm raises on purpose derives from EsfmError.

Library code raises these and never exits; the CLI turns them into a message
and an exit code (see ``esfm.cli.common``).
"""

from __future__ import annotations


class EsfmError(Exception):
    """Base class for esfm errors.

    Args:
        message: what failed, naming the value involved.
        hint: the next step for the operator, such as the command to run.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nHint: {self.hint}"
        return self.message


class ConfigError(EsfmError):
    """Invalid option, environment variable or configuration file."""

    exit_code = 2


class DataError(EsfmError):
    """Missing or malformed dataset files."""


class ModelError(EsfmError):
    """Missing, inconsistent or numerically broken model directory."""


class TrainingError(EsfmError):
    """Training failed, for example on a non-finite loss."""


class ClusterError(EsfmError):
    """The cluster is unreachable, rejected a request or is in a bad state."""


class LocalClusterError(ClusterError):
    """The local Elasticsearch distribution failed to download, start or stop."""


class MappingError(EsfmError):
    """Invalid mapping files or versions."""


class MigrationError(EsfmError):
    """A migration step failed; the alias still points at the previous index."""


class LockError(MigrationError):
    """Another migration holds the lock."""


class TemplateError(EsfmError):
    """Unknown template, or invalid template parameters."""


class QueryError(EsfmError):
    """Invalid query values, or a metadata document that is not in the index."""


class ValidationFailed(EsfmError):
    """The cluster disagrees with the model."""

    def __init__(self, message: str, *, mismatches: list | None = None, hint=None):
        super().__init__(message, hint=hint)
        self.mismatches = mismatches or []
