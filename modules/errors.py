"""Error types that carry a user-facing message.

Every error the engine raises on bad input derives from `AtelierError`, so the
CLI, the UI and the API can show `str(err)` to the user without a stack trace.
"""


class AtelierError(Exception):
    """Base class: `str(err)` is a complete, user-facing message."""


class InvalidParams(AtelierError, ValueError):
    """A job parameter is out of range or names something unknown; `field` names it when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CheckpointError(AtelierError):
    """A checkpoint is missing, truncated, corrupt or of an unknown architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint needs code execution to load; it was refused, never run."""


class JobInterrupted(AtelierError):
    """The job was interrupted between steps."""
