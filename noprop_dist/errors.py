"""User-facing errors.

Every problem a user can cause (bad config, bad data, corrupt checkpoint, missing
cluster) is raised as a :class:`NoPropError` subclass whose message is one line that
names the problem and the fix. The CLI prints that line and exits with ``exit_code``
instead of showing a traceback.
"""

import errno


class NoPropError(Exception):
    """Base class: a one-line, actionable message; the CLI exits with ``exit_code``."""

    exit_code = 1


class ConfigError(NoPropError):
    """The configuration or the command line is wrong (checked before any work starts)."""

    exit_code = 2


class DeviceUnavailable(ConfigError):
    """``train.device`` or ``cluster.gpus_per_worker`` asks for a GPU that is not there
    (checked before anything is written)."""


class DataError(NoPropError):
    """A dataset is missing, malformed, or inconsistent."""


class CheckpointError(NoPropError):
    """A run directory or one of its files is missing, corrupt, or of an unknown schema."""


class ClusterError(NoPropError):
    """The Ray cluster is unreachable or cannot satisfy the requested placement."""


class TrainingDiverged(NoPropError):
    """A unit's loss stopped being finite: the run stops, its last finite checkpoints stay."""


class RunStopped(NoPropError):
    """A stop signal (SIGINT, SIGTERM) ended a run: the checkpoints of finished epochs stay and
    ``--resume`` continues; the CLI exits with 128 + the signal's number, as a shell expects."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class WriteFailed(NoPropError, OSError):
    """A file could not be written (a full disk, a quota, a read-only filesystem): raised by the
    run directory's writers with the file's path, so that the message says which file; an
    ``OSError`` too (``errno``, ``strerror``, ``filename``), so that code catching those still
    does. What was written before it stays complete (every file is replaced atomically)."""

    def __str__(self) -> str:
        return f"could not write {self.filename} ({self.strerror or 'write failed'})"


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
"""Errors that only a write raises: a full disk, a quota, a file too large, a read-only mount."""


def write_failure(exc: BaseException) -> str | None:
    """"could not write PATH (reason)" when ``exc`` is a failed write, else None."""
    if isinstance(exc, WriteFailed):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        where = exc.filename or "a file"
        return f"could not write {where} ({exc.strerror})"
    return None
